//! Reading a Hugging Face checkpoint: `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped, converted to the requested dtype on load.

use crate::error::{read_json, Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

pub struct Checkpoint {
    dir: PathBuf,
    st: MmapedSafetensors,
    names: HashSet<String>,
    pub family: String,
    pub dtype: DType,
    pub device: Device,
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    pub fn open(dir: &Path, family: &str, dtype: DType, device: &Device) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let idx: Index = read_json(&index)?;
            let mut files: Vec<String> = idx.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            return Err(Error::Config {
                path: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json in this folder".into(),
            });
        };
        for f in &files {
            if !f.exists() {
                return Err(Error::io(
                    f,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in the index is missing",
                    ),
                ));
            }
        }
        // SAFETY: the files are memory-mapped read-only; align never writes to a model folder it reads.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::Config {
            path: dir.to_path_buf(),
            msg: format!("cannot read safetensors: {e}"),
        })?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            st,
            names,
            family: family.to_string(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.iter()
    }

    /// Load a tensor, check its shape, convert it to the checkpoint's compute dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if !self.has(name) {
            return Err(Error::MissingTensor {
                file: self.dir.clone(),
                name: name.to_string(),
                family: self.family.clone(),
            });
        }
        let t = self.st.load(name, &self.device)?;
        if t.dims() != shape {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
                context: Some(format!(
                    "in {}; does config.json match the weights?",
                    self.dir.display()
                )),
            });
        }
        Ok(t.to_dtype(self.dtype)?)
    }
}
