// moex from C#: P/Invoke declarations of moex.h and owning wrappers built on SafeHandle.
// The library is found as "moex" (libmoex.so through LD_LIBRARY_PATH or the system paths).
using System;
using System.Runtime.InteropServices;
using System.Text;

namespace Moex {

/// <summary>A failed moex call: the status code and the library's message.</summary>
public class MoexException : Exception {
  public int Status { get; }
  public MoexException(int status, string message) : base(message) { Status = status; }
}

[StructLayout(LayoutKind.Sequential)]
public struct ModelInfo {
  public ulong StructSize;
  public uint NLayers, NExperts, TopK, Hidden, Ffn;
  public int MasterPrecision;
  public ulong ExpertBytes;
  public uint NCheckpointLayers, Reserved0;
}

[StructLayout(LayoutKind.Sequential)]
public struct ExecutorParams {
  public ulong StructSize, CacheBytes;
  public int Backend, Device;
  public uint Threads;
  public int Eviction, Gating, Prediction, CachePrecision;
  public uint Flags;
  public double LrfuLambda, GateThreshold;
  public uint PrefetchDepth, Reserved0;
  // since 0.2 (pointer fields borrowed during moex_executor_create)
  public int Miss;
  public uint MissFlags;
  public double HobbitTHigh, HobbitTSkip;
  public int LowPrecision;
  public uint Reserved1;
  public double LowPrecisionShare;
  public ulong MaxPrefetchBytesInFlight;
  public IntPtr LayerCacheBytes;
  public ulong LayerCacheCount;
  public IntPtr GateSensitivities;
  public ulong GateSensitivityCount;
  public IntPtr PregatePath;
  public IntPtr HotProfile;
  public ulong HotProfileCount;
  public IntPtr FutureTrace;
}

[StructLayout(LayoutKind.Sequential)]
public struct Stats {
  public ulong StructSize, Steps, Tokens, ExpertCalls, Hits, Misses, BytesLoaded, Evictions, Skipped, Prefetches,
      PrefetchHits, StallNs, ComputeNs, RouteNs, TotalNs;
  public double HitRate;
  // since 0.2
  public ulong Predicted, PredictedCorrect, Selected, PrefetchWastedBytes, ComputedAtSource;
  [MarshalAs(UnmanagedType.ByValArray, SizeConst = 16)] public ulong[] MissesByPrecision;
  public double Recall;
}

/// <summary>Raw entry points (no bool, no strings by default marshaling: paths go as UTF-8 bytes).</summary>
public static class Native {
  const string Lib = "moex";
  public const uint AllLayers = 0xFFFFFFFF;
  [DllImport(Lib)] public static extern uint moex_version_number();
  [DllImport(Lib)] public static extern IntPtr moex_version_string();
  [DllImport(Lib)] public static extern IntPtr moex_status_string(int status);
  [DllImport(Lib)] public static extern IntPtr moex_last_error_message();
  [DllImport(Lib)] public static extern int moex_model_open(byte[] path, IntPtr parameters, IntPtr progress, IntPtr userData, out ModelHandle model);
  [DllImport(Lib)] public static extern void moex_model_destroy(IntPtr model);
  [DllImport(Lib)] public static extern void moex_model_info_init(ref ModelInfo info);
  [DllImport(Lib)] public static extern int moex_model_get_info(ModelHandle model, ref ModelInfo info);
  [DllImport(Lib)] public static extern void moex_executor_params_init_size(ref ExecutorParams p, ulong size);
  [DllImport(Lib)] public static extern int moex_executor_create(ModelHandle model, ref ExecutorParams p, out ExecutorHandle executor);
  [DllImport(Lib)] public static extern void moex_executor_destroy(IntPtr executor);
  [DllImport(Lib)] public static extern int moex_executor_forward_f32(ExecutorHandle e, uint layer, float[] hidden, UIntPtr n, float[] output);
  [DllImport(Lib)] public static extern int moex_executor_step_f32(ExecutorHandle e, float[] hidden, UIntPtr n, float[] output);
  [DllImport(Lib)] public static extern void moex_stats_init_size(ref Stats s, ulong size);
  [DllImport(Lib)] public static extern int moex_executor_get_stats(ExecutorHandle e, uint layer, ref Stats s);
  [DllImport(Lib)] public static extern int moex_executor_stats_json(ExecutorHandle e, byte[] buf, UIntPtr size, out UIntPtr needed);
  [DllImport(Lib)] public static extern int moex_executor_record_trace(ExecutorHandle e, uint on);
  [DllImport(Lib)] public static extern int moex_executor_get_trace(ExecutorHandle e, out TraceHandle trace);
  [DllImport(Lib)] public static extern void moex_trace_destroy(IntPtr trace);
  [DllImport(Lib)] public static extern int moex_trace_shape(TraceHandle t, out ulong tokens, out uint layers, out uint topK, out uint experts);

  public static string Utf8(IntPtr p) {
    if (p == IntPtr.Zero) return "";
    int n = 0;
    while (Marshal.ReadByte(p, n) != 0) ++n;
    var bytes = new byte[n];
    Marshal.Copy(p, bytes, 0, n);
    return Encoding.UTF8.GetString(bytes);
  }

  public static byte[] CString(string s) => Encoding.UTF8.GetBytes(s + "\0");

  public static void Check(int status) {
    if (status == 0) return;
    // The message is thread-local in C: read it on the calling thread, right away.
    throw new MoexException(status, Utf8(moex_status_string(status)) + ": " + Utf8(moex_last_error_message()));
  }
}

public sealed class ModelHandle : SafeHandle {
  public ModelHandle() : base(IntPtr.Zero, true) {}
  public override bool IsInvalid => handle == IntPtr.Zero;
  protected override bool ReleaseHandle() { Native.moex_model_destroy(handle); return true; }
}

public sealed class ExecutorHandle : SafeHandle {
  public ExecutorHandle() : base(IntPtr.Zero, true) {}
  public override bool IsInvalid => handle == IntPtr.Zero;
  protected override bool ReleaseHandle() { Native.moex_executor_destroy(handle); return true; }
}

public sealed class TraceHandle : SafeHandle {
  public TraceHandle() : base(IntPtr.Zero, true) {}
  public override bool IsInvalid => handle == IntPtr.Zero;
  protected override bool ReleaseHandle() { Native.moex_trace_destroy(handle); return true; }
}

/// <summary>An opened checkpoint. Dispose it (or let the SafeHandle finalizer do it).</summary>
public sealed class Model : IDisposable {
  internal readonly ModelHandle Handle;
  public Model(string path) {
    Native.Check(Native.moex_model_open(Native.CString(path), IntPtr.Zero, IntPtr.Zero, IntPtr.Zero, out Handle));
  }
  public ModelInfo Info() {
    var info = new ModelInfo();
    Native.moex_model_info_init(ref info);
    Native.Check(Native.moex_model_get_info(Handle, ref info));
    return info;
  }
  public void Dispose() => Handle.Dispose();
}

/// <summary>Runs a model's MoE layers. Not thread-safe: one per thread.</summary>
public sealed class Executor : IDisposable {
  readonly ExecutorHandle handle;
  readonly int hidden;
  /// <summary>gating: MOEX_GATING_* (2 = adaptive, with gateThreshold); prediction: MOEX_PREDICTION_*
  /// (2 = speculative, prefetchDepth layers ahead).</summary>
  public Executor(Model model, ulong cacheBytes = 0, int eviction = 0, uint threads = 0, int gating = 0,
                  double gateThreshold = 0, int prediction = 0, uint prefetchDepth = 0) {
    hidden = (int)model.Info().Hidden;
    var p = new ExecutorParams();
    Native.moex_executor_params_init_size(ref p, (ulong)Marshal.SizeOf(typeof(ExecutorParams)));
    p.CacheBytes = cacheBytes;
    p.Eviction = eviction;
    p.Threads = threads;
    p.Gating = gating;
    p.GateThreshold = gateThreshold;
    p.Prediction = prediction;
    p.PrefetchDepth = prefetchDepth;
    Native.Check(Native.moex_executor_create(model.Handle, ref p, out handle));
  }
  UIntPtr Rows(float[] x) {
    if (x.Length == 0 || x.Length % hidden != 0) throw new ArgumentException($"length {x.Length} is not a multiple of hidden {hidden}");
    return new UIntPtr((uint)(x.Length / hidden));
  }
  public float[] Forward(uint layer, float[] x) {
    var output = new float[x.Length];
    Native.Check(Native.moex_executor_forward_f32(handle, layer, x, Rows(x), output));
    return output;
  }
  public float[] Step(float[] x) {
    var output = new float[x.Length];
    Native.Check(Native.moex_executor_step_f32(handle, x, Rows(x), output));
    return output;
  }
  public Stats GetStats() {
    var s = new Stats { MissesByPrecision = new ulong[16] };
    Native.moex_stats_init_size(ref s, (ulong)Marshal.SizeOf(typeof(Stats)));
    Native.Check(Native.moex_executor_get_stats(handle, Native.AllLayers, ref s));
    return s;
  }
  public string StatsJson() {
    Native.Check(Native.moex_executor_stats_json(handle, null, UIntPtr.Zero, out UIntPtr need));
    var buf = new byte[(int)need.ToUInt32() + 1];
    Native.Check(Native.moex_executor_stats_json(handle, buf, new UIntPtr((uint)buf.Length), out need));
    return Encoding.UTF8.GetString(buf, 0, (int)need.ToUInt32());
  }
  public void RecordTrace(bool on) => Native.Check(Native.moex_executor_record_trace(handle, on ? 1u : 0u));
  public (ulong tokens, uint layers, uint topK, uint experts) TraceShape() {
    Native.Check(Native.moex_executor_get_trace(handle, out TraceHandle trace));
    using (trace) {
      Native.Check(Native.moex_trace_shape(trace, out ulong t, out uint l, out uint k, out uint e));
      return (t, l, k, e);
    }
  }
  public void Dispose() => handle.Dispose();
}

}  // namespace Moex
