//! The embedded default of `align dpo` / `align sft` with no arguments: a small chat model and
//! a preference sample (4.3 MB, `assets/default`), compiled into the binary so that it works
//! from any folder and after `cargo install`. It is used from the source tree when that is at
//! hand, and otherwise unpacked once into a cache folder.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

macro_rules! asset {
    ($p:literal) => {
        (
            $p,
            include_bytes!(concat!("../../assets/default/", $p)) as &[u8],
        )
    };
}

/// (path under the default folder, bytes).
const FILES: [(&str, &[u8]); 7] = [
    asset!("model/config.json"),
    asset!("model/generation_config.json"),
    asset!("model/model.safetensors"),
    asset!("model/tokenizer.json"),
    asset!("model/tokenizer_config.json"),
    asset!("prefs-train.parquet"),
    asset!("prefs-eval.parquet"),
];

/// The folder holding the embedded default: `assets/default` of the source tree this binary
/// was built from or of the current folder, else the copy unpacked from the binary.
pub fn default_assets() -> Option<PathBuf> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/default");
    let cwd = PathBuf::from("assets/default");
    if let Some(p) = [built, cwd]
        .into_iter()
        .find(|p| p.join("model/config.json").exists())
    {
        return Some(p);
    }
    let dir = cache_dir().join(format!(
        "default-{}-{:016x}",
        env!("CARGO_PKG_VERSION"),
        digest()
    ));
    match unpack(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            eprintln!("warning: could not unpack the embedded default: {e}");
            None
        }
    }
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("align")
}

/// FNV-1a over the embedded files (names the cache folder, so a new build gets a new copy).
fn digest() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES {
        for b in name.as_bytes().iter().chain(bytes.iter()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Write the embedded files into `dir` (a temporary sibling renamed into place, so a
/// concurrent or killed unpack never leaves a half-written default). Present and complete:
/// nothing to do.
pub fn unpack(dir: &Path) -> Result<()> {
    let complete = |d: &Path| {
        FILES
            .iter()
            .all(|(n, b)| std::fs::metadata(d.join(n)).is_ok_and(|m| m.len() == b.len() as u64))
    };
    if complete(dir) {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(".unpack-{}", std::process::id()));
    for (name, bytes) in FILES {
        let p = tmp.join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
    }
    if std::fs::rename(&tmp, dir).is_err() {
        // another process won the race: use its copy
        std::fs::remove_dir_all(&tmp).ok();
        if !complete(dir) {
            return Err(Error::Msg(format!(
                "{}: incomplete embedded default",
                dir.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The unpacked copy is byte-identical to assets/default.
    #[test]
    fn unpacked_default_equals_the_assets() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("default");
        super::unpack(&dir).unwrap();
        super::unpack(&dir).unwrap(); // idempotent
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/default");
        for (name, _) in super::FILES {
            assert_eq!(
                std::fs::read(dir.join(name)).unwrap(),
                std::fs::read(src.join(name)).unwrap(),
                "{name}"
            );
        }
    }
}
