//! The static musl build of istio-cni (the image's, the bench's) lays its code out with `hot-text.ld`: the
//! functions a CNI call runs come first and together, so that the exec'ed plugin pages in a few 64 KiB windows of
//! code instead of one per function (scripts/hot-text.sh generates the file and says why). Other builds link as
//! usual; the layout never changes what runs.

fn main() {
    println!("cargo:rerun-if-changed=hot-text.ld");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "musl" {
        let script = std::path::Path::new(&var("CARGO_MANIFEST_DIR")).join("hot-text.ld");
        if script.is_file() {
            println!(
                "cargo:rustc-link-arg-bin=istio-cni=-Wl,-T,{}",
                script.display()
            );
        }
    }
}
