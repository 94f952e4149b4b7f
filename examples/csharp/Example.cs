// moex from C#: open the demo model, run a layer and a whole step, compare with the C example's
// reference, read statistics and the routing trace.
// usage: mono moex_example_csharp.exe <model dir> <reference file from examples/c>
using System;
using System.Globalization;
using System.IO;
using System.Linq;
using System.Runtime.InteropServices;
using Moex;

static class Example {
  const int Tokens = 4;
  // Same library, same inputs, one thread: identical results expected; float noise allowed only.
  const double RelTol = 1e-5;

  static float[] Row(string line) =>
      line.Split(new[] {' '}, StringSplitOptions.RemoveEmptyEntries).Select(v => float.Parse(v, CultureInfo.InvariantCulture)).ToArray();

  static double MaxRelDiff(float[] got, float[] want) {
    if (got.Length != want.Length) return double.PositiveInfinity;
    double scale = want.Max(v => Math.Abs((double)v)), worst = 0;
    for (int i = 0; i < got.Length; ++i) worst = Math.Max(worst, Math.Abs((double)got[i] - want[i]));
    return scale > 0 ? worst / scale : double.PositiveInfinity;
  }

  static int Main(string[] args) {
    if (args.Length != 2) {
      Console.Error.WriteLine("usage: moex_example_csharp.exe <model dir> <reference file>");
      return 2;
    }
    // Pinned struct sizes of moex.h.
    if (Marshal.SizeOf<ExecutorParams>() != 184 || Marshal.SizeOf<Stats>() != 304 || Marshal.SizeOf<ModelInfo>() != 48) {
      Console.Error.WriteLine("struct layouts do not match moex.h");
      return 1;
    }
    Console.WriteLine($"moex {Native.Utf8(Native.moex_version_string())} ({Native.moex_version_number()}) via P/Invoke");
    var lines = File.ReadAllLines(args[1]);
    var head = lines[0].Split(' ');
    if (lines.Length < 4 || head[0] != "moex-ref" || head[1] != "2") {
      Console.Error.WriteLine($"{args[1]}: not a moex reference file");
      return 1;
    }
    int hidden = int.Parse(head[3], CultureInfo.InvariantCulture);
    float[] refLayer0 = Row(lines[1]), refStep = Row(lines[2]), refAdaptive = Row(lines[3]);
    try {
      using (var model = new Model(args[0])) {
        var info = model.Info();
        Console.WriteLine($"model: {info.NLayers} layers x {info.NExperts} experts, top-{info.TopK}, hidden {info.Hidden}");
        var x = new float[Tokens * hidden];
        for (int t = 0; t < Tokens; ++t)
          for (int i = 0; i < hidden; ++i) x[t * hidden + i] = (float)((t * 131 + i * 31) % 97) / 48.5f - 1.0f;
        using (var ex = new Executor(model, 6 * info.ExpertBytes, 2 /* LFU */, 1)) {
          ex.RecordTrace(true);
          var layer0 = ex.Forward(0, x);
          var step = ex.Step(x);
          double d0 = MaxRelDiff(layer0, refLayer0), d1 = MaxRelDiff(step, refStep);
          Console.WriteLine($"max relative difference to the C reference: layer 0 {d0:G3}, step {d1:G3}");
          var st = ex.GetStats();
          var json = ex.StatsJson();
          Console.WriteLine($"stats: {st.Hits} hits, {st.Misses} misses, hit rate {st.HitRate:F2}; JSON {json.Length} bytes");
          var (tokens, layers, topK, experts) = ex.TraceShape();
          Console.WriteLine($"trace: {tokens} tokens x {layers} layers x top-{topK} of {experts} experts");
          try {
            new Model(Path.Combine(args[0], "does-not-exist")).Dispose();
            Console.WriteLine("FAILED: opening a missing model succeeded");
            return 1;
          } catch (MoexException e) {
            Console.WriteLine($"expected error: {e.Message}");
          }
          // The adaptive gate with speculative prefetching, as the C example configures it.
          double d2;
          Stats ast;
          using (var ad = new Executor(model, 6 * info.ExpertBytes, 2 /* LFU */, 1, gating: 2, gateThreshold: 0.05,
                                       prediction: 2, prefetchDepth: 1)) {
            d2 = MaxRelDiff(ad.Step(x), refAdaptive);
            ast = ad.GetStats();
          }
          Console.WriteLine($"adaptive + speculative: difference to C {d2:G3}, {ast.Skipped} skipped, {ast.Prefetches} prefetches, recall {ast.Recall:F2}");
          bool ok = d0 <= RelTol && d1 <= RelTol && d2 <= RelTol && ast.Prefetches > 0 && st.Hits + st.Misses > 0 && json.Contains("\"total\"") && tokens >= Tokens;
          Console.WriteLine(ok ? "OK" : "FAILED");
          return ok ? 0 : 1;
        }
      }
    } catch (MoexException e) {
      Console.Error.WriteLine($"moex_example_csharp: {e.Message}");
      return 1;
    }
  }
}
