//! `totalseg-rust`: TotalSegmentator's `--fast` CT pipeline (DESIGN.md section 2) with the
//! network run by ONNX Runtime through its C API. Many cases per process, one session.
//!
//! ```text
//! totalseg-rust --model M.onnx --threads N [--ort-lib LIB] --jobs JOBS.jsonl
//! totalseg-rust --model M.onnx --threads N [--ort-lib LIB] --input IN.nii.gz --output OUT.nii.gz
//! ```
//! Each line of JOBS is `{"case_id": ..., "input": ..., "output": ...}`; with `--jobs -` the lines
//! come from stdin and each is served as soon as it arrives (a caller keeps one process, hence
//! one session, for many cases). Each case prints one JSON line on stdout: case_id, status
//! ("ok"/"error"), error, and the stage timings in seconds (load_s, preprocess_s, inference_s,
//! postprocess_s, save_s, wall_s) with n_tiles. A failing case does not stop the others.
//! Exit status: 0 all cases ok, 1 some case failed, 2 nothing could run (library, model, jobs).

// Axis loops index several 3-element arrays at once; iterators would hide that.
#![allow(clippy::needless_range_loop)]

mod f16;
#[allow(dead_code)] // the Python pipeline's kernel (src/ffi.rs); here for its tests
mod head;
mod kernels;
mod nifti;
mod orient;
mod ort;
mod pipeline;
mod preprocess;
mod resample;
mod sliding_window;
mod volume;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{value_parser, Arg, ArgGroup, Command};
use serde_json::{json, Value};

const DEFAULT_PATCH: [usize; 3] = [112, 112, 128];
const DEFAULT_CLASSES: usize = 118;

fn cli() -> Command {
    Command::new("totalseg-rust")
        .about("TotalSegmentator --fast CT segmentation; network through the ONNX Runtime C API")
        .arg(
            Arg::new("model")
                .long("model")
                .value_name("ONNX")
                .required(true)
                .value_parser(value_parser!(PathBuf))
                .help("exported model (input 1x1xZxYxX)"),
        )
        .arg(
            Arg::new("threads")
                .long("threads")
                .value_name("N")
                .value_parser(value_parser!(usize))
                .help("ORT intra-op threads and rayon threads [default: CPUs in the affinity mask]"),
        )
        .arg(
            Arg::new("ort-lib")
                .long("ort-lib")
                .value_name("PATH")
                .value_parser(value_parser!(PathBuf))
                .help("libonnxruntime.so [default: $TSBENCH_ORT_LIB, else the active Python's onnxruntime]"),
        )
        .arg(
            Arg::new("jobs")
                .long("jobs")
                .value_name("JSONL")
                .value_parser(value_parser!(PathBuf))
                .help("one {\"case_id\",\"input\",\"output\"} object per line; - for stdin"),
        )
        .arg(Arg::new("input").long("input").value_name("NIFTI").value_parser(value_parser!(PathBuf)).requires("output"))
        .arg(Arg::new("output").long("output").value_name("NIFTI").value_parser(value_parser!(PathBuf)).requires("input"))
        .arg(
            Arg::new("step")
                .long("step-size")
                .value_name("F")
                .value_parser(value_parser!(f64))
                .default_value("0.8")
                .help("sliding-window tile step (fraction of the patch)"),
        )
        .group(ArgGroup::new("mode").args(["jobs", "input"]).required(true))
}

struct Job {
    case_id: Value,
    paths: Result<(PathBuf, PathBuf)>,
}

fn parse_job(line: &str, line_no: usize) -> Job {
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Job { case_id: Value::Null, paths: Err(anyhow::anyhow!("jobs line {line_no}: invalid JSON: {e}")) },
    };
    let case_id = value.get("case_id").cloned().unwrap_or(Value::Null);
    let path = |key: &str| -> Result<PathBuf> {
        match value.get(key).and_then(Value::as_str) {
            Some(s) if !s.is_empty() => Ok(PathBuf::from(s)),
            _ => bail!("jobs line {line_no}: missing string field {key:?}"),
        }
    };
    let paths = path("input").and_then(|i| Ok((i, path("output")?)));
    Job { case_id, paths }
}

/// Job lines, read lazily: with `-` the process serves one case per stdin line as it arrives.
fn job_lines(source: &Path) -> Result<Box<dyn Iterator<Item = std::io::Result<String>>>> {
    if source == Path::new("-") {
        return Ok(Box::new(std::io::stdin().lines()));
    }
    let file = std::fs::File::open(source).with_context(|| format!("cannot open jobs file {}", source.display()))?;
    Ok(Box::new(std::io::BufReader::new(file).lines()))
}

fn row(case_id: &Value, result: &Result<pipeline::Timings>, common: &Value) -> Value {
    let mut r = match result {
        Ok(t) => json!({
            "case_id": case_id, "status": "ok", "error": null,
            "load_s": t.load_s, "preprocess_s": t.preprocess_s, "inference_s": t.inference_s,
            "postprocess_s": t.postprocess_s, "save_s": t.save_s, "wall_s": t.wall_s,
            "n_tiles": t.n_tiles, "network_s": t.network_s, "accumulate_s": t.accumulate_s, "resampled": t.resampled,
            "input_shape": t.input_shape, "network_shape": t.network_shape,
        }),
        Err(e) => json!({"case_id": case_id, "status": "error", "error": format!("{e:#}")}),
    };
    if let (Value::Object(r), Value::Object(c)) = (&mut r, common) {
        r.extend(c.clone());
    }
    r
}

fn run() -> Result<bool> {
    let m = cli().get_matches();
    let threads =
        m.get_one::<usize>("threads").copied().unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().context("cannot start the thread pool")?;
    let cfg = pipeline::Config { step_size: *m.get_one::<f64>("step").unwrap(), ..Default::default() };

    let mut lines = match m.get_one::<PathBuf>("jobs") {
        Some(src) => Some(job_lines(src)?),
        None => None,
    };

    let lib = ort::find_library(m.get_one::<PathBuf>("ort-lib").map(PathBuf::as_path))?;
    let t = Instant::now();
    let rt = ort::Runtime::load(&lib)?;
    let mut session = ort::Session::new(rt.clone(), m.get_one::<PathBuf>("model").unwrap(), threads, DEFAULT_PATCH, DEFAULT_CLASSES)?;
    let common = json!({
        "threads": threads, "ort_version": rt.version, "ort_lib": rt.path.display().to_string(),
        "session_s": t.elapsed().as_secs_f64(), "model_input": session.input_name(),
    });

    let stdout = std::io::stdout();
    let mut all_ok = true;
    let mut workspace = sliding_window::Workspace::default();
    let mut process = |job: Job| -> Result<()> {
        let result = match &job.paths {
            Ok((input, output)) => pipeline::run_case(&mut session, &mut workspace, &cfg, input, output),
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        all_ok &= result.is_ok();
        let mut out = stdout.lock();
        writeln!(out, "{}", row(&job.case_id, &result, &common))?;
        out.flush()?;
        Ok(())
    };
    match lines.as_mut() {
        Some(lines) => {
            for (i, line) in lines.enumerate() {
                let line = line.context("cannot read jobs")?;
                if !line.trim().is_empty() {
                    process(parse_job(&line, i + 1))?;
                }
            }
        }
        None => {
            let (input, output) = (m.get_one::<PathBuf>("input").unwrap(), m.get_one::<PathBuf>("output").unwrap());
            process(Job { case_id: json!(input.display().to_string()), paths: Ok((input.clone(), output.clone())) })?;
        }
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("totalseg-rust: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
