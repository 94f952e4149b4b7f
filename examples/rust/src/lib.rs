//! Safe Rust bindings to moex's C API (`moex.h`): hand-written `extern "C"` declarations in
//! [`sys`], and owning wrappers ([`Model`], [`Executor`], [`Trace`]) that destroy their handle on
//! drop and turn every failing status into an [`Error`] carrying the library's message.

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::raw::c_char;
use std::ptr;

/// Raw declarations mirroring moex.h (layouts checked by tests in this crate).
pub mod sys {
    use std::os::raw::{c_char, c_void};

    pub type Status = i32;
    pub const OK: Status = 0;
    pub const ALL_LAYERS: u32 = 0xFFFF_FFFF;
    pub const NO_EXPERT: u32 = 0xFFFF_FFFF;

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct ModelParams {
        pub struct_size: u64,
        pub flags: u32,
        pub master_precision: i32,
        pub extra_precisions: u32,
        pub reserved0: u32,
        // since 0.2
        pub keep_block_formats: u32,
        pub reserved1: u32,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct ModelInfo {
        pub struct_size: u64,
        pub n_layers: u32,
        pub n_experts: u32,
        pub top_k: u32,
        pub hidden: u32,
        pub ffn: u32,
        pub master_precision: i32,
        pub expert_bytes: u64,
        pub n_checkpoint_layers: u32,
        pub reserved0: u32,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct ExecutorParams {
        pub struct_size: u64,
        pub cache_bytes: u64,
        pub backend: i32,
        pub device: i32,
        pub threads: u32,
        pub eviction: i32,
        pub gating: i32,
        pub prediction: i32,
        pub cache_precision: i32,
        pub flags: u32,
        pub lrfu_lambda: f64,
        pub gate_threshold: f64,
        pub prefetch_depth: u32,
        pub reserved0: u32,
        // since 0.2 (pointer fields as usize: same size and alignment, and Default stays derivable)
        pub miss: i32,
        pub miss_flags: u32,
        pub hobbit_t_high: f64,
        pub hobbit_t_skip: f64,
        pub low_precision: i32,
        pub reserved1: u32,
        pub low_precision_share: f64,
        pub max_prefetch_bytes_in_flight: u64,
        pub layer_cache_bytes: usize,
        pub layer_cache_count: u64,
        pub gate_sensitivities: usize,
        pub gate_sensitivity_count: u64,
        pub pregate_path: usize,
        pub hot_profile: usize,
        pub hot_profile_count: u64,
        pub future_trace: usize,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Stats {
        pub struct_size: u64,
        pub steps: u64,
        pub tokens: u64,
        pub expert_calls: u64,
        pub hits: u64,
        pub misses: u64,
        pub bytes_loaded: u64,
        pub evictions: u64,
        pub skipped: u64,
        pub prefetches: u64,
        pub prefetch_hits: u64,
        pub stall_ns: u64,
        pub compute_ns: u64,
        pub route_ns: u64,
        pub total_ns: u64,
        pub hit_rate: f64,
        // since 0.2
        pub predicted: u64,
        pub predicted_correct: u64,
        pub selected: u64,
        pub prefetch_wasted_bytes: u64,
        pub computed_at_source: u64,
        pub misses_by_precision: [u64; 16],
        pub recall: f64,
    }

    #[repr(C)]
    pub struct moex_model {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct moex_executor {
        _private: [u8; 0],
    }
    #[repr(C)]
    pub struct moex_trace {
        _private: [u8; 0],
    }

    pub type ProgressFn = Option<unsafe extern "C" fn(u64, u64, *const c_char, *mut c_void)>;

    extern "C" {
        pub fn moex_version_number() -> u32;
        pub fn moex_version_string() -> *const c_char;
        pub fn moex_status_string(status: Status) -> *const c_char;
        pub fn moex_last_error_message() -> *const c_char;
        pub fn moex_model_write_demo(dir: *const c_char, params: *const c_void) -> Status;
        pub fn moex_model_params_init_size(p: *mut ModelParams, size: u64);
        pub fn moex_model_open(path: *const c_char, params: *const ModelParams, progress: ProgressFn,
                               user_data: *mut c_void, out: *mut *mut moex_model) -> Status;
        pub fn moex_model_destroy(m: *mut moex_model);
        pub fn moex_model_info_init(i: *mut ModelInfo);
        pub fn moex_model_get_info(m: *const moex_model, i: *mut ModelInfo) -> Status;
        pub fn moex_executor_params_init_size(p: *mut ExecutorParams, size: u64);
        pub fn moex_executor_create(m: *const moex_model, p: *const ExecutorParams,
                                    out: *mut *mut moex_executor) -> Status;
        pub fn moex_executor_destroy(e: *mut moex_executor);
        pub fn moex_executor_forward_f32(e: *mut moex_executor, layer: u32, hidden: *const f32, n: usize,
                                         out: *mut f32) -> Status;
        pub fn moex_executor_forward_bf16(e: *mut moex_executor, layer: u32, hidden: *const u16, n: usize,
                                          out: *mut u16) -> Status;
        pub fn moex_executor_step_f32(e: *mut moex_executor, hidden: *const f32, n: usize, out: *mut f32) -> Status;
        pub fn moex_stats_init_size(s: *mut Stats, size: u64);
        pub fn moex_executor_get_stats(e: *const moex_executor, layer: u32, s: *mut Stats) -> Status;
        pub fn moex_executor_stats_json(e: *const moex_executor, buf: *mut c_char, size: usize,
                                        needed: *mut usize) -> Status;
        pub fn moex_executor_record_trace(e: *mut moex_executor, on: u32) -> Status;
        pub fn moex_executor_get_trace(e: *const moex_executor, out: *mut *mut moex_trace) -> Status;
        pub fn moex_trace_destroy(t: *mut moex_trace);
        pub fn moex_trace_shape(t: *const moex_trace, tokens: *mut u64, layers: *mut u32, top_k: *mut u32,
                                experts: *mut u32) -> Status;
        pub fn moex_trace_copy(t: *const moex_trace, experts: *mut u32, weights: *mut f32, capacity: u64,
                               needed: *mut u64) -> Status;
    }
}

/// A failed moex call: the status code and the library's message.
#[derive(Debug, Clone)]
pub struct Error {
    pub status: i32,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: moex_status_string returns static text for any code.
        let text = unsafe { CStr::from_ptr(sys::moex_status_string(self.status)) };
        write!(f, "{}: {}", text.to_string_lossy(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn check(status: sys::Status) -> Result<()> {
    if status == sys::OK {
        return Ok(());
    }
    // SAFETY: never NULL, valid until the next moex call on this thread; copied at once.
    let message = unsafe { CStr::from_ptr(sys::moex_last_error_message()) }.to_string_lossy().into_owned();
    Err(Error { status, message })
}

fn c_path(path: &str) -> Result<CString> {
    CString::new(path).map_err(|_| Error { status: -1, message: "path contains NUL".into() })
}

/// The library's version number and text.
pub fn version() -> (u32, String) {
    // SAFETY: static text.
    unsafe { (sys::moex_version_number(), CStr::from_ptr(sys::moex_version_string()).to_string_lossy().into_owned()) }
}

/// Writes the generated demo checkpoint (default shape) into the folder `dir`.
pub fn write_demo(dir: &str) -> Result<()> {
    let d = c_path(dir)?;
    // SAFETY: valid C string; NULL params = defaults.
    check(unsafe { sys::moex_model_write_demo(d.as_ptr(), ptr::null()) })
}

/// Model settings (default: the library's).
#[derive(Default, Clone, Copy, Debug)]
pub struct ModelOptions {
    /// Keep GGUF Q8_0/Q4_0/Q4_K and fp8 (128x128 scales) experts in that format instead of
    /// decoding them to bf16 (`moex_model_params.keep_block_formats`, since 0.2).
    pub keep_block_formats: bool,
}

/// An opened model. Shareable between threads for reading (`Sync`): const C calls may run concurrently.
pub struct Model {
    raw: *mut sys::moex_model,
}

unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    /// Opens a safetensors file or folder, or a .gguf file.
    pub fn open(path: &str) -> Result<Model> {
        Model::open_with(path, ModelOptions::default())
    }

    /// Opens a model with options.
    pub fn open_with(path: &str, opts: ModelOptions) -> Result<Model> {
        let p = c_path(path)?;
        let mut params = sys::ModelParams::default();
        let mut raw = ptr::null_mut();
        // SAFETY: all pointers valid for the call; params initialized by the library for the
        // size of this mirror; the library sets raw (NULL on failure).
        check(unsafe {
            sys::moex_model_params_init_size(&mut params, std::mem::size_of::<sys::ModelParams>() as u64);
            params.keep_block_formats = opts.keep_block_formats as u32;
            sys::moex_model_open(p.as_ptr(), &params, None, ptr::null_mut(), &mut raw)
        })?;
        Ok(Model { raw })
    }

    pub fn info(&self) -> Result<sys::ModelInfo> {
        let mut i = sys::ModelInfo::default();
        // SAFETY: live handle; i initialized by moex_model_info_init.
        check(unsafe {
            sys::moex_model_info_init(&mut i);
            sys::moex_model_get_info(self.raw, &mut i)
        })?;
        Ok(i)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: owned handle, destroyed once.
        unsafe { sys::moex_model_destroy(self.raw) }
    }
}

/// Executor settings (0 = library default).
#[derive(Default, Clone, Copy, Debug)]
pub struct ExecutorOptions {
    pub cache_bytes: u64,
    pub eviction: i32,
    pub threads: u32,
    /// MOEX_GATING_* (2 = adaptive) and its threshold.
    pub gating: i32,
    pub gate_threshold: f64,
    /// MOEX_PREDICTION_* (2 = speculative) and its look-ahead.
    pub prediction: i32,
    pub prefetch_depth: u32,
}

/// Runs a model's MoE layers. `Send` but not `Sync`: calls need exclusive access (`&mut self`).
pub struct Executor {
    raw: *mut sys::moex_executor,
    hidden: usize,
}

unsafe impl Send for Executor {}

impl Executor {
    pub fn new(model: &Model, opts: ExecutorOptions) -> Result<Executor> {
        let hidden = model.info()?.hidden as usize;
        let mut p = sys::ExecutorParams::default();
        let mut raw = ptr::null_mut();
        // SAFETY: live model handle; params initialized by the library.
        check(unsafe {
            sys::moex_executor_params_init_size(&mut p, std::mem::size_of::<sys::ExecutorParams>() as u64);
            p.cache_bytes = opts.cache_bytes;
            p.eviction = opts.eviction;
            p.threads = opts.threads;
            p.gating = opts.gating;
            p.gate_threshold = opts.gate_threshold;
            p.prediction = opts.prediction;
            p.prefetch_depth = opts.prefetch_depth;
            sys::moex_executor_create(model.raw, &p, &mut raw)
        })?;
        Ok(Executor { raw, hidden })
    }

    fn rows(&self, len: usize) -> Result<usize> {
        if self.hidden == 0 || len == 0 || len % self.hidden != 0 {
            return Err(Error { status: -1, message: format!("length {} is not a positive multiple of hidden {}", len, self.hidden) });
        }
        Ok(len / self.hidden)
    }

    /// The MoE output of `layer` for hidden.len() / hidden tokens.
    pub fn forward(&mut self, layer: u32, hidden: &[f32]) -> Result<Vec<f32>> {
        let n = self.rows(hidden.len())?;
        let mut out = vec![0f32; hidden.len()];
        // SAFETY: slices of n * hidden floats; distinct buffers.
        check(unsafe { sys::moex_executor_forward_f32(self.raw, layer, hidden.as_ptr(), n, out.as_mut_ptr()) })?;
        Ok(out)
    }

    /// The MoE output of `layer` in bf16 (u16 bit patterns).
    pub fn forward_bf16(&mut self, layer: u32, hidden: &[u16]) -> Result<Vec<u16>> {
        let n = self.rows(hidden.len())?;
        let mut out = vec![0u16; hidden.len()];
        // SAFETY: as forward.
        check(unsafe { sys::moex_executor_forward_bf16(self.raw, layer, hidden.as_ptr(), n, out.as_mut_ptr()) })?;
        Ok(out)
    }

    /// All layers with the residual, in place: h <- h + moe_l(h).
    pub fn step(&mut self, hidden: &mut [f32]) -> Result<()> {
        let n = self.rows(hidden.len())?;
        let p = hidden.as_mut_ptr();
        // SAFETY: in place is allowed by the C API.
        check(unsafe { sys::moex_executor_step_f32(self.raw, p, n, p) })
    }

    pub fn stats(&self) -> Result<sys::Stats> {
        let mut s = sys::Stats::default();
        // SAFETY: live handle, initialized output struct.
        check(unsafe {
            sys::moex_stats_init_size(&mut s, std::mem::size_of::<sys::Stats>() as u64);
            sys::moex_executor_get_stats(self.raw, sys::ALL_LAYERS, &mut s)
        })?;
        Ok(s)
    }

    pub fn stats_json(&self) -> Result<String> {
        let mut need = 0usize;
        // SAFETY: size query with a NULL buffer, then a buffer of need + 1 bytes.
        check(unsafe { sys::moex_executor_stats_json(self.raw, ptr::null_mut(), 0, &mut need) })?;
        let mut buf = vec![0u8; need + 1];
        check(unsafe { sys::moex_executor_stats_json(self.raw, buf.as_mut_ptr() as *mut c_char, buf.len(), ptr::null_mut()) })?;
        buf.truncate(need);
        String::from_utf8(buf).map_err(|_| Error { status: -99, message: "JSON is not UTF-8".into() })
    }

    pub fn record_trace(&mut self, on: bool) -> Result<()> {
        // SAFETY: live handle.
        check(unsafe { sys::moex_executor_record_trace(self.raw, on as u32) })
    }

    pub fn trace(&self) -> Result<Trace> {
        let mut raw = ptr::null_mut();
        // SAFETY: live handle.
        check(unsafe { sys::moex_executor_get_trace(self.raw, &mut raw) })?;
        Ok(Trace { raw })
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // SAFETY: owned handle, destroyed once.
        unsafe { sys::moex_executor_destroy(self.raw) }
    }
}

/// A routing trace.
pub struct Trace {
    raw: *mut sys::moex_trace,
}

unsafe impl Send for Trace {}
unsafe impl Sync for Trace {}

impl Trace {
    /// (tokens, layers, top_k, experts).
    pub fn shape(&self) -> Result<(u64, u32, u32, u32)> {
        let (mut t, mut l, mut k, mut e) = (0u64, 0u32, 0u32, 0u32);
        // SAFETY: live handle, valid out pointers.
        check(unsafe { sys::moex_trace_shape(self.raw, &mut t, &mut l, &mut k, &mut e) })?;
        Ok((t, l, k, e))
    }

    /// Expert ids and weights, [tokens][layers][top_k].
    pub fn arrays(&self) -> Result<(Vec<u32>, Vec<f32>)> {
        let mut need = 0u64;
        // SAFETY: size query, then buffers of that many entries.
        check(unsafe { sys::moex_trace_copy(self.raw, ptr::null_mut(), ptr::null_mut(), 0, &mut need) })?;
        let mut ids = vec![0u32; need as usize];
        let mut w = vec![0f32; need as usize];
        check(unsafe { sys::moex_trace_copy(self.raw, ids.as_mut_ptr(), w.as_mut_ptr(), need, ptr::null_mut()) })?;
        Ok((ids, w))
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        // SAFETY: owned handle, destroyed once.
        unsafe { sys::moex_trace_destroy(self.raw) }
    }
}

#[allow(dead_code)]
fn _assert_layouts() {
    // Sizes pinned in moex.h (tests/capi/capi_layout_test.c pins the C side).
    const _: () = assert!(std::mem::size_of::<sys::ModelParams>() == 32);
    const _: () = assert!(std::mem::size_of::<sys::ModelInfo>() == 48);
    const _: () = assert!(std::mem::size_of::<sys::ExecutorParams>() == 184);
    const _: () = assert!(std::mem::size_of::<sys::Stats>() == 304);
}
