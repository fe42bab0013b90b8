//! Paths of the workspace's binaries, built before the tests run (`cargo build --workspace`).

use std::path::PathBuf;

/// The path of a workspace binary (`capture`, `compactor`), next to the test executable's
/// `deps/` folder. Fails with the build command to run when it is missing.
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/{profile}/deps/{test}-{hash}
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).ok_or_else(|| {
        anyhow::anyhow!("cannot locate the target directory from {}", exe.display())
    })?;
    let path = profile_dir.join(name);
    if !path.is_file() {
        anyhow::bail!(
            "binary {} is missing: run `cargo build --workspace` before the tests",
            path.display()
        );
    }
    Ok(path)
}
