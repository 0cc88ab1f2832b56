//! File sources: single files, lists, directories and globs.

use crate::error::{DatasetError, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// Identifies one row of a source, for error and skip messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RowId {
    /// The file the row comes from.
    pub file: PathBuf,
    /// 0-based row index within that file.
    pub row: u64,
}

impl fmt::Display for RowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} row {}", self.file.display(), self.row)
    }
}

/// An ordered list of parquet files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    files: Vec<PathBuf>,
}

impl Source {
    /// One file.
    pub fn from_file(path: impl Into<PathBuf>) -> Self {
        Source {
            files: vec![path.into()],
        }
    }

    /// Expands each entry: a directory gives all `*.parquet` files in it (sorted, not
    /// recursive), a path with `*`/`?`/`[..]` in it is a glob (matches sorted), anything
    /// else is taken as a file (which must exist). Errors when nothing matches at all.
    pub fn from_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        let mut files = Vec::new();
        for p in paths {
            let p = p.as_ref();
            let s = p.to_string_lossy();
            if s.contains(['*', '?', '[']) {
                let mut m = expand_glob(p)?;
                m.sort();
                files.extend(m);
            } else if p.is_dir() {
                let mut m = Vec::new();
                let rd = std::fs::read_dir(p).map_err(|e| DatasetError::io(p, e))?;
                for ent in rd {
                    let ent = ent.map_err(|e| DatasetError::io(p, e))?;
                    let path = ent.path();
                    if path.is_file() && path.extension().is_some_and(|e| e == "parquet") {
                        m.push(path);
                    }
                }
                m.sort();
                files.extend(m);
            } else if p.is_file() {
                files.push(p.to_path_buf());
            } else {
                return Err(DatasetError::io(
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
                ));
            }
        }
        if files.is_empty() {
            return Err(DatasetError::NoFiles(
                paths.iter().map(|p| p.as_ref().to_path_buf()).collect(),
            ));
        }
        Ok(Source { files })
    }

    /// The expanded files, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

/// Expands a glob whose wildcards may appear in any path component (no `**`).
fn expand_glob(pattern: &Path) -> Result<Vec<PathBuf>> {
    use std::path::Component;
    let mut current: Vec<PathBuf> = vec![PathBuf::new()];
    for comp in pattern.components() {
        let mut next = Vec::new();
        match comp {
            Component::Normal(os) => {
                let part = os.to_string_lossy();
                if part.contains(['*', '?', '[']) {
                    for base in &current {
                        let dir = if base.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            base.as_path()
                        };
                        let Ok(rd) = std::fs::read_dir(dir) else {
                            continue;
                        };
                        let mut names: Vec<_> = rd
                            .filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .filter(|n| wildcard_match(&part, n))
                            .collect();
                        names.sort();
                        for n in names {
                            next.push(base.join(n));
                        }
                    }
                } else {
                    for base in &current {
                        let p = base.join(os);
                        next.push(p);
                    }
                }
            }
            other => {
                for base in &current {
                    next.push(base.join(other.as_os_str()));
                }
            }
        }
        current = next;
    }
    Ok(current.into_iter().filter(|p| p.is_file()).collect())
}

/// Shell-style matching of one path component: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        // returns (matched, length of class in pattern incl. brackets)
        let mut i = 1;
        let negate = i < p.len() && (p[i] == '!' || p[i] == '^');
        if negate {
            i += 1;
        }
        let mut matched = false;
        let start = i;
        while i < p.len() && (p[i] != ']' || i == start) {
            if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
                if p[i] <= c && c <= p[i + 2] {
                    matched = true;
                }
                i += 3;
            } else {
                if p[i] == c {
                    matched = true;
                }
                i += 1;
            }
        }
        if i >= p.len() {
            return None; // unterminated: treat '[' literally
        }
        Some((matched != negate, i + 1))
    }
    fn rec(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|k| rec(&p[1..], &n[k..])),
            Some('?') => !n.is_empty() && rec(&p[1..], &n[1..]),
            Some('[') => match (n.first(), class(p, n.first().copied().unwrap_or('\0'))) {
                (Some(_), Some((ok, len))) => ok && rec(&p[len..], &n[1..]),
                (None, _) => false,
                (Some(c), None) => *c == '[' && rec(&p[1..], &n[1..]),
            },
            Some(c) => n.first() == Some(c) && rec(&p[1..], &n[1..]),
        }
    }
    rec(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.parquet", "a.parquet"));
        assert!(!wildcard_match("*.parquet", "a.parquet.bak"));
        assert!(wildcard_match("part-?.parquet", "part-1.parquet"));
        assert!(wildcard_match("part-[0-3].parquet", "part-2.parquet"));
        assert!(!wildcard_match("part-[!0-3].parquet", "part-2.parquet"));
        assert!(wildcard_match("[", "["));
    }
}
