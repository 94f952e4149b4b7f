"""moex from Python through ctypes: a thin, safe wrapper over the C API (moex.h).

Handles are owned by Python objects that are context managers (and are destroyed on garbage
collection as a fallback); every failing call raises MoexError with the status and the library's
message. Arrays are any buffer of float32 (array.array('f'), numpy.float32 arrays, ...) or lists.

The shared library is found through $MOEX_LIBRARY (a path), else $MOEX_PREFIX/lib*/libmoex.so,
else the system's library path.
"""
import array
import ctypes
import ctypes.util
import glob
import os

__all__ = ["MoexError", "Model", "Executor", "Trace", "write_demo", "version", "library"]

OK = 0
ERR_INVALID_ARGUMENT = -1
ERR_UNSUPPORTED = -2
ERR_STRUCT_SIZE = -3
ERR_OUT_OF_MEMORY = -4
ERR_IO = -5
ERR_CORRUPT = -6
ERR_NOT_FOUND = -7
ERR_INTERNAL = -99

PRECISION = {"default": 0, "f32": 1, "f16": 2, "bf16": 3, "int8": 4, "int4": 5, "int2": 6,
             # checkpoint block formats: reported for models opened with keep_block_formats
             "q8_0": 7, "q4_0": 8, "q4_k": 9, "fp8_e4m3": 10}
EVICTION = {"default": 0, "lru": 1, "lfu": 2, "lrfu": 3, "hobbit": 4, "static_hot_set": 5, "belady": 6}
GATING = {"default": 0, "fixed": 1, "adaptive": 2}
PREDICTION = {"default": 0, "none": 1, "speculative": 2, "pregate_file": 3, "pregate_routing": 4}
MISS = {"default": 0, "load": 1, "hobbit": 2, "cost_model": 3}
ALL_LAYERS = 0xFFFFFFFF
NO_EXPERT = 0xFFFFFFFF

_u32, _i32, _u64, _sz = ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_size_t


class DemoParams(ctypes.Structure):
    _fields_ = [("struct_size", _u64), ("n_layers", _u32), ("n_experts", _u32), ("top_k", _u32),
                ("hidden", _u32), ("ffn", _u32), ("precision", _i32), ("seed", _u64)]


class ModelParams(ctypes.Structure):
    _fields_ = [("struct_size", _u64), ("flags", _u32), ("master_precision", _i32),
                ("extra_precisions", _u32), ("reserved0", _u32),
                # since 0.2
                ("keep_block_formats", _u32), ("reserved1", _u32)]


class ModelInfo(ctypes.Structure):
    _fields_ = [("struct_size", _u64), ("n_layers", _u32), ("n_experts", _u32), ("top_k", _u32),
                ("hidden", _u32), ("ffn", _u32), ("master_precision", _i32), ("expert_bytes", _u64),
                ("n_checkpoint_layers", _u32), ("reserved0", _u32)]


class ExecutorParams(ctypes.Structure):
    _fields_ = [("struct_size", _u64), ("cache_bytes", _u64), ("backend", _i32), ("device", _i32),
                ("threads", _u32), ("eviction", _i32), ("gating", _i32), ("prediction", _i32),
                ("cache_precision", _i32), ("flags", _u32), ("lrfu_lambda", ctypes.c_double),
                ("gate_threshold", ctypes.c_double), ("prefetch_depth", _u32), ("reserved0", _u32),
                # since 0.2
                ("miss", _i32), ("miss_flags", _u32), ("hobbit_t_high", ctypes.c_double),
                ("hobbit_t_skip", ctypes.c_double), ("low_precision", _i32), ("reserved1", _u32),
                ("low_precision_share", ctypes.c_double), ("max_prefetch_bytes_in_flight", _u64),
                ("layer_cache_bytes", ctypes.c_void_p), ("layer_cache_count", _u64),
                ("gate_sensitivities", ctypes.c_void_p), ("gate_sensitivity_count", _u64),
                ("pregate_path", ctypes.c_char_p), ("hot_profile", ctypes.c_void_p),
                ("hot_profile_count", _u64), ("future_trace", ctypes.c_void_p)]


class Stats(ctypes.Structure):
    _fields_ = [(n, _u64) for n in ("struct_size", "steps", "tokens", "expert_calls", "hits", "misses",
                                    "bytes_loaded", "evictions", "skipped", "prefetches", "prefetch_hits",
                                    "stall_ns", "compute_ns", "route_ns", "total_ns")] + [("hit_rate", ctypes.c_double)] + \
        [(n, _u64) for n in ("predicted", "predicted_correct", "selected", "prefetch_wasted_bytes",
                             "computed_at_source")] + \
        [("misses_by_precision", _u64 * 16), ("recall", ctypes.c_double)]

    def as_dict(self):
        d = {name: getattr(self, name) for name, _ in self._fields_ if name != "struct_size"}
        d["misses_by_precision"] = list(self.misses_by_precision)
        return d


for _s, _size in ((DemoParams, 40), (ModelParams, 32), (ModelInfo, 48), (ExecutorParams, 184), (Stats, 304)):
    assert ctypes.sizeof(_s) == _size, f"{_s.__name__} does not match moex.h"

PROGRESS_FN = ctypes.CFUNCTYPE(None, _u64, _u64, ctypes.c_char_p, ctypes.c_void_p)
LOG_FN = ctypes.CFUNCTYPE(None, _i32, ctypes.c_char_p, ctypes.c_void_p)


def _find_library():
    path = os.environ.get("MOEX_LIBRARY")
    if path:
        return path
    prefix = os.environ.get("MOEX_PREFIX")
    if prefix:
        hits = sorted(glob.glob(os.path.join(prefix, "lib*", "libmoex.so*")))
        if hits:
            return hits[0]
    return ctypes.util.find_library("moex") or "libmoex.so"


def _declare(lib):
    P, vp = ctypes.POINTER, ctypes.c_void_p
    sigs = {
        "moex_version_number": (_u32, []),
        "moex_version_string": (ctypes.c_char_p, []),
        "moex_status_string": (ctypes.c_char_p, [_i32]),
        "moex_last_error_message": (ctypes.c_char_p, []),
        "moex_set_log_callback": (_i32, [LOG_FN, _i32, vp]),
        "moex_demo_params_init": (None, [P(DemoParams)]),
        "moex_model_write_demo": (_i32, [ctypes.c_char_p, P(DemoParams)]),
        "moex_model_params_init_size": (None, [P(ModelParams), _u64]),
        "moex_model_open": (_i32, [ctypes.c_char_p, P(ModelParams), PROGRESS_FN, vp, P(vp)]),
        "moex_model_destroy": (None, [vp]),
        "moex_model_info_init": (None, [P(ModelInfo)]),
        "moex_model_get_info": (_i32, [vp, P(ModelInfo)]),
        "moex_model_architecture": (_i32, [vp, ctypes.c_char_p, _sz, P(_sz)]),
        "moex_executor_params_init_size": (None, [P(ExecutorParams), _u64]),
        "moex_executor_create": (_i32, [vp, P(ExecutorParams), P(vp)]),
        "moex_executor_destroy": (None, [vp]),
        "moex_executor_forward_f32": (_i32, [vp, _u32, vp, _sz, vp]),
        "moex_executor_forward_bf16": (_i32, [vp, _u32, vp, _sz, vp]),
        "moex_executor_step_f32": (_i32, [vp, vp, _sz, vp]),
        "moex_executor_step_bf16": (_i32, [vp, vp, _sz, vp]),
        "moex_stats_init_size": (None, [P(Stats), _u64]),
        "moex_executor_get_stats": (_i32, [vp, _u32, P(Stats)]),
        "moex_executor_stats_json": (_i32, [vp, ctypes.c_char_p, _sz, P(_sz)]),
        "moex_executor_reset_stats": (_i32, [vp]),
        "moex_executor_record_trace": (_i32, [vp, _u32]),
        "moex_executor_begin_sequence": (_i32, [vp]),
        "moex_executor_get_trace": (_i32, [vp, P(vp)]),
        "moex_trace_load": (_i32, [ctypes.c_char_p, P(vp)]),
        "moex_trace_write": (_i32, [vp, ctypes.c_char_p, _i32]),
        "moex_trace_destroy": (None, [vp]),
        "moex_trace_shape": (_i32, [vp, P(_u64), P(_u32), P(_u32), P(_u32)]),
        "moex_trace_copy": (_i32, [vp, vp, vp, _u64, P(_u64)]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_lib = None


def library():
    """The loaded libmoex (loaded on first use)."""
    global _lib
    if _lib is None:
        _lib = _declare(ctypes.CDLL(_find_library()))
    return _lib


class MoexError(RuntimeError):
    """A moex call failed: .status is the moex_status code, the text is the library's message."""

    def __init__(self, status, what):
        lib = library()
        self.status = status
        super().__init__(f"{what}: {lib.moex_status_string(status).decode()}: "
                         f"{lib.moex_last_error_message().decode(errors='replace')}")


def _check(status, what):
    if status != OK:
        raise MoexError(status, what)


def version():
    """(number, string) of the loaded library."""
    lib = library()
    return lib.moex_version_number(), lib.moex_version_string().decode()


def _path(p):
    return os.fsencode(p)


def write_demo(path, n_layers=0, n_experts=0, top_k=0, hidden=0, ffn=0, seed=0):
    """Writes the generated Mixtral-shaped demo checkpoint into folder `path` (0 = default)."""
    lib = library()
    p = DemoParams()
    lib.moex_demo_params_init(ctypes.byref(p))
    for k, v in dict(n_layers=n_layers, n_experts=n_experts, top_k=top_k, hidden=hidden, ffn=ffn, seed=seed).items():
        if v:
            setattr(p, k, v)
    _check(lib.moex_model_write_demo(_path(path), ctypes.byref(p)), "moex_model_write_demo")


def _f32(data, count, what):
    """A ctypes view of `data` as count float32 values (copies lists and foreign buffers)."""
    if isinstance(data, array.array) and data.typecode == "f":
        buf = data
    else:
        try:
            mv = memoryview(data).cast("B")
            buf = (ctypes.c_float * (len(mv) // 4)).from_buffer_copy(mv)
        except TypeError:
            buf = array.array("f", data)
    if len(buf) < count:
        raise ValueError(f"{what}: {len(buf)} values, need {count}")
    return buf


def _addr(buf):
    return ctypes.addressof((ctypes.c_char * 1).from_buffer(buf))


class _Handle:
    _destroy = None

    def __init__(self, ptr):
        self._ptr = ptr

    @property
    def ptr(self):
        if not self._ptr:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._ptr

    def close(self):
        """Destroys the C object (idempotent)."""
        if self._ptr:
            getattr(library(), self._destroy)(self._ptr)
            self._ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class Model(_Handle):
    """An opened checkpoint (safetensors file or folder, or .gguf)."""
    _destroy = "moex_model_destroy"

    def __init__(self, path, progress=None, extra_precisions=(), keep_block_formats=False):
        """keep_block_formats: keep GGUF Q8_0/Q4_0/Q4_K and fp8 (128x128 scales) experts in that
        format instead of decoding them to bf16 (moex_model_params.keep_block_formats)."""
        lib = library()
        params = ModelParams()
        lib.moex_model_params_init_size(ctypes.byref(params), ctypes.sizeof(params))
        for name in extra_precisions:
            params.extra_precisions |= 1 << PRECISION[name]
        params.keep_block_formats = 1 if keep_block_formats else 0
        cb = PROGRESS_FN(lambda d, t, w, _: progress(d, t, w.decode())) if progress else PROGRESS_FN()
        out = ctypes.c_void_p()
        _check(lib.moex_model_open(_path(path), ctypes.byref(params), cb, None, ctypes.byref(out)), "moex_model_open")
        super().__init__(out.value)

    def info(self):
        lib = library()
        i = ModelInfo()
        lib.moex_model_info_init(ctypes.byref(i))
        _check(lib.moex_model_get_info(self.ptr, ctypes.byref(i)), "moex_model_get_info")
        return {name: getattr(i, name) for name, _ in i._fields_ if name not in ("struct_size", "reserved0")}

    def architecture(self):
        lib = library()
        need = ctypes.c_size_t()
        _check(lib.moex_model_architecture(self.ptr, None, 0, ctypes.byref(need)), "moex_model_architecture")
        buf = ctypes.create_string_buffer(need.value + 1)
        _check(lib.moex_model_architecture(self.ptr, buf, len(buf), None), "moex_model_architecture")
        return buf.value.decode()

    def executor(self, **kw):
        return Executor(self, **kw)


class Trace(_Handle):
    """A routing trace: recorded by an executor or loaded from a file."""
    _destroy = "moex_trace_destroy"

    @classmethod
    def load(cls, path):
        out = ctypes.c_void_p()
        _check(library().moex_trace_load(_path(path), ctypes.byref(out)), "moex_trace_load")
        return cls(out.value)

    def shape(self):
        """(tokens, layers, top_k, experts)."""
        t, l, k, e = _u64(), _u32(), _u32(), _u32()
        _check(library().moex_trace_shape(self.ptr, ctypes.byref(t), ctypes.byref(l), ctypes.byref(k), ctypes.byref(e)),
               "moex_trace_shape")
        return t.value, l.value, k.value, e.value

    def arrays(self):
        """(expert ids, gate weights) as flat arrays [tokens][layers][top_k]."""
        lib = library()
        need = _u64()
        _check(lib.moex_trace_copy(self.ptr, None, None, 0, ctypes.byref(need)), "moex_trace_copy")
        ids, w = array.array("I", bytes(4 * need.value)), array.array("f", bytes(4 * need.value))
        if need.value:
            _check(lib.moex_trace_copy(self.ptr, _addr(ids), _addr(w), need.value, None), "moex_trace_copy")
        return ids, w

    def write(self, path, jsonl=False):
        _check(library().moex_trace_write(self.ptr, _path(path), 2 if jsonl else 1), "moex_trace_write")


class Executor(_Handle):
    """Runs the model's MoE layers with a fast-tier expert cache. One per thread."""
    _destroy = "moex_executor_destroy"

    def __init__(self, model, cache_bytes=0, eviction="default", cache_precision="default", threads=0,
                 gating="default", gate_threshold=0.0, prediction="default", prefetch_depth=0, miss="default"):
        lib = library()
        p = ExecutorParams()
        lib.moex_executor_params_init_size(ctypes.byref(p), ctypes.sizeof(p))
        p.cache_bytes, p.eviction, p.threads = cache_bytes, EVICTION[eviction], threads
        p.cache_precision = PRECISION[cache_precision]
        p.gating, p.gate_threshold = GATING[gating], gate_threshold
        p.prediction, p.prefetch_depth, p.miss = PREDICTION[prediction], prefetch_depth, MISS[miss]
        out = ctypes.c_void_p()
        _check(lib.moex_executor_create(model.ptr, ctypes.byref(p), ctypes.byref(out)), "moex_executor_create")
        super().__init__(out.value)
        self.hidden = model.info()["hidden"]

    def forward(self, layer, hidden, n_tokens):
        """The MoE output of `layer` for n_tokens rows of hidden states (float32) -> array('f')."""
        n = n_tokens * self.hidden
        x = _f32(hidden, n, "hidden")
        out = array.array("f", bytes(4 * n))
        _check(library().moex_executor_forward_f32(self.ptr, layer, _addr(x), n_tokens, _addr(out)),
               "moex_executor_forward_f32")
        return out

    def step(self, hidden, n_tokens):
        """All MoE layers with the residual: h <- h + moe_l(h) -> array('f')."""
        n = n_tokens * self.hidden
        out = array.array("f", _f32(hidden, n, "hidden")[:n])
        _check(library().moex_executor_step_f32(self.ptr, _addr(out), n_tokens, _addr(out)), "moex_executor_step_f32")
        return out

    def stats(self, layer=ALL_LAYERS):
        lib = library()
        s = Stats()
        lib.moex_stats_init_size(ctypes.byref(s), ctypes.sizeof(s))
        _check(lib.moex_executor_get_stats(self.ptr, layer, ctypes.byref(s)), "moex_executor_get_stats")
        return s.as_dict()

    def stats_json(self):
        lib = library()
        need = ctypes.c_size_t()
        _check(lib.moex_executor_stats_json(self.ptr, None, 0, ctypes.byref(need)), "moex_executor_stats_json")
        buf = ctypes.create_string_buffer(need.value + 1)
        _check(lib.moex_executor_stats_json(self.ptr, buf, len(buf), None), "moex_executor_stats_json")
        return buf.value.decode()

    def record_trace(self, on=True):
        _check(library().moex_executor_record_trace(self.ptr, 1 if on else 0), "moex_executor_record_trace")

    def trace(self):
        out = ctypes.c_void_p()
        _check(library().moex_executor_get_trace(self.ptr, ctypes.byref(out)), "moex_executor_get_trace")
        return Trace(out.value)
