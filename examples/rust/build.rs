// Links libmoex from an installed prefix: $MOEX_PREFIX (lib/ or lib64/ below it), else the system.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=MOEX_PREFIX");
    if let Ok(prefix) = std::env::var("MOEX_PREFIX") {
        for lib in ["lib", "lib64", "lib/x86_64-linux-gnu"] {
            let dir = Path::new(&prefix).join(lib);
            if dir.join("libmoex.so").exists() {
                println!("cargo:rustc-link-search=native={}", dir.display());
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            }
        }
    }
    println!("cargo:rustc-link-lib=dylib=moex");
}
