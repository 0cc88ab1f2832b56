//! Streaming benchmark: writes parquet files of synthetic preference rows (long random
//! texts, 8,192-row row groups) into a temp dir, streams them back as `PreferencePair`s,
//! and prints rows/s and peak RSS for two sizes, showing memory does not grow with size.
//!
//!     cargo run --release -p align-datasets --example stream_bench -- --rows 1000000
//!
//! Each read runs in a child process so that its VmHWM (peak RSS) is its own.

use align_datasets::{PreferenceStream, Source, StreamOptions};
use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

const RG: usize = 8192;

fn vm_hwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn text(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len);
        while s.len() < len {
            let r = self.next();
            let w = 2 + (r % 9) as usize;
            for k in 0..w {
                s.push((b'a' + ((r >> (8 + 5 * k)) % 26) as u8) as char);
            }
            s.push(' ');
        }
        s
    }
}

fn generate(path: &Path, rows: usize) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("prompt", DataType::Utf8, false),
        Field::new("chosen", DataType::Utf8, false),
        Field::new("rejected", DataType::Utf8, false),
    ]));
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(RG))
        .build(); // uncompressed: the on-disk size is the data size
    let f = std::fs::File::create(path).expect("create bench file");
    let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props)).expect("writer");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut done = 0;
    while done < rows {
        let n = RG.min(rows - done);
        let col = |rng: &mut Rng, len: usize| {
            Arc::new(StringArray::from_iter_values((0..n).map(|_| rng.text(len))))
        };
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![col(&mut rng, 300), col(&mut rng, 420), col(&mut rng, 420)],
        )
        .expect("batch");
        w.write(&b).expect("write");
        done += n;
    }
    w.close().expect("close");
}

fn read(path: &Path, shuffle: bool) {
    let opts = StreamOptions {
        shuffle,
        seed: 1,
        shuffle_buffer: 10_000,
        ..Default::default()
    };
    let t = Instant::now();
    let s = PreferenceStream::open(&Source::from_file(path), opts, None).expect("open");
    let (mut n, mut bytes) = (0u64, 0u64);
    for p in s {
        let p = p.expect("row");
        n += 1;
        bytes += (p.prompt.len() + p.chosen.len() + p.rejected.len()) as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    println!("{n} {secs} {bytes} {}", vm_hwm_kb());
}

fn child(args: &[&str]) -> String {
    let exe = std::env::current_exe().expect("exe");
    let out = Command::new(exe).args(args).output().expect("spawn");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
    };
    if let Some(p) = get("--gen") {
        let rows: usize = get("--rows").and_then(|r| r.parse().ok()).unwrap_or(1000);
        generate(Path::new(p), rows);
        return;
    }
    if let Some(p) = get("--read") {
        read(Path::new(p), args.iter().any(|a| a == "--shuffle"));
        return;
    }
    let rows: usize = get("--rows")
        .and_then(|r| r.parse().ok())
        .unwrap_or(1_000_000);
    let dir = std::env::temp_dir().join(format!("align-stream-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    println!("| rows | file size | mode | rows/s | MB/s (text) | peak RSS |");
    println!("| ---: | ---: | --- | ---: | ---: | ---: |");
    for n in [rows / 4, rows] {
        let path = dir.join(format!("bench-{n}.parquet"));
        let t = Instant::now();
        child(&[
            "--gen",
            path.to_str().expect("utf8 path"),
            "--rows",
            &n.to_string(),
        ]);
        let gen_s = t.elapsed().as_secs_f64();
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "generated {n} rows, {:.2} GB in {gen_s:.1}s",
            size as f64 / 1e9
        );
        for shuffle in [false, true] {
            let mut a = vec!["--read", path.to_str().expect("utf8 path")];
            if shuffle {
                a.push("--shuffle");
            }
            let out = child(&a);
            let v: Vec<f64> = out
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            let (got, secs, bytes, hwm) = (v[0], v[1], v[2], v[3]);
            assert_eq!(got as usize, n);
            println!(
                "| {n} | {:.2} GB | {} | {:.0} | {:.0} | {:.0} MB |",
                size as f64 / 1e9,
                if shuffle {
                    "shuffle (buffer 10k)"
                } else {
                    "sequential"
                },
                got / secs,
                bytes / secs / 1e6,
                hwm / 1024.0
            );
        }
        std::fs::remove_file(&path).expect("remove bench file");
    }
    let _ = std::fs::remove_dir(&dir);
}
