//! moex from Rust: open the demo model, run a layer and a whole step, compare with the C example's
//! reference, read statistics and the routing trace.
//! usage: moex_example_rust <model dir> <reference file from examples/c>
use std::process::ExitCode;

const TOKENS: usize = 4;
/// Same library, same inputs, one thread: identical results expected; float noise allowed only.
const REL_TOL: f64 = 1e-5;

fn read_reference(path: &str) -> Result<(usize, Vec<f32>, Vec<f32>, Vec<f32>), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {}", path, e))?;
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    if head.len() != 4 || head[0] != "moex-ref" || head[1] != "2" {
        return Err(format!("{}: not a moex reference file", path));
    }
    let hidden: usize = head[3].parse().map_err(|_| "bad hidden".to_string())?;
    let mut row = || -> Result<Vec<f32>, String> {
        lines.next().unwrap_or("").split_whitespace().map(|v| v.parse::<f32>().map_err(|e| e.to_string())).collect()
    };
    let layer0 = row()?;
    let step = row()?;
    let adaptive = row()?;
    Ok((hidden, layer0, step, adaptive))
}

fn max_rel_diff(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max((*v as f64).abs())).max(f64::MIN_POSITIVE);
    got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs())) / scale
}

fn run(model_dir: &str, ref_path: &str) -> Result<bool, Box<dyn std::error::Error>> {
    let (number, text) = moex::version();
    println!("moex {} ({}) via Rust", text, number);
    let (hidden, ref_layer0, ref_step, ref_adaptive) = read_reference(ref_path)?;
    let model = moex::Model::open(model_dir)?;
    let info = model.info()?;
    println!("model: {} layers x {} experts, top-{}, hidden {}", info.n_layers, info.n_experts, info.top_k, info.hidden);
    assert_eq!(info.hidden as usize, hidden);
    let x: Vec<f32> = (0..TOKENS)
        .flat_map(|t| (0..hidden).map(move |i| ((t * 131 + i * 31) % 97) as f32 / 48.5 - 1.0))
        .collect();
    let mut ex = moex::Executor::new(&model, moex::ExecutorOptions { cache_bytes: 6 * info.expert_bytes, eviction: 2, threads: 1, ..Default::default() })?;
    // The adaptive gate with speculative prefetching, as the C example configures it.
    let mut ad = moex::Executor::new(&model, moex::ExecutorOptions {
        cache_bytes: 6 * info.expert_bytes, eviction: 2, threads: 1,
        gating: 2, gate_threshold: 0.05, prediction: 2, prefetch_depth: 1,
    })?;
    drop(model); // the executors keep what they need
    let mut ah = x.clone();
    ad.step(&mut ah)?;
    let ast = ad.stats()?;
    let d2 = max_rel_diff(&ah, &ref_adaptive);
    println!("adaptive + speculative: difference to C {:.3e}, {} skipped, {} prefetches, recall {:.2}",
             d2, ast.skipped, ast.prefetches, ast.recall);
    ex.record_trace(true)?;
    let layer0 = ex.forward(0, &x)?;
    let mut h = x.clone();
    ex.step(&mut h)?;
    let (d0, d1) = (max_rel_diff(&layer0, &ref_layer0), max_rel_diff(&h, &ref_step));
    println!("max relative difference to the C reference: layer 0 {:.3e}, step {:.3e}", d0, d1);
    let st = ex.stats()?;
    let json = ex.stats_json()?;
    println!("stats: {} hits, {} misses, hit rate {:.2}; JSON {} bytes", st.hits, st.misses, st.hit_rate, json.len());
    let trace = ex.trace()?;
    let (t, l, k, e) = trace.shape()?;
    let (ids, _) = trace.arrays()?;
    println!("trace: {} tokens x {} layers x top-{} of {} experts", t, l, k, e);
    match moex::Model::open(&format!("{}/does-not-exist", model_dir)) {
        Ok(_) => return Ok(false),
        Err(err) => println!("expected error: {}", err),
    }
    Ok(d0 <= REL_TOL && d1 <= REL_TOL && d2 <= REL_TOL && ast.prefetches > 0 && st.hits + st.misses > 0 && json.contains("\"total\"")
        && t as usize >= TOKENS && ids.len() as u64 == t * l as u64 * k as u64)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: moex_example_rust <model dir> <reference file>");
        return ExitCode::from(2);
    }
    match run(&args[1], &args[2]) {
        Ok(true) => {
            println!("OK");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("FAILED");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("moex_example_rust: {}", e);
            ExitCode::FAILURE
        }
    }
}
