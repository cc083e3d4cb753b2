//! Attach/detach cycles through the core crate, for bench/cycle.ts (the Rust row of its table).
//!
//! ```sh
//! cargo run --release --example cycle -p loopdev -- FILE CYCLES
//! ```
//!
//! One cycle = `LoopControl::loop_for_fd` (get-free, open, LOOP_CONFIGURE, with its flock and retry) then
//! `Loop::clear_fd` and drop (close) — what `using lo = ctl.loopForFd(fd)` does in TypeScript, without N-API.
//! Prints one JSON line `{"cycles":N,"ns":TOTAL,"median_ns":M}`, the same shape as bench/cycle.c.

use loopdev::{ConfigureOptions, Loop, LoopControl};
use std::fs::OpenOptions;
use std::os::unix::io::AsFd;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (file, cycles) = match (args.get(1), args.get(2).and_then(|n| n.parse::<u64>().ok()).filter(|&n| n > 0)) {
        (Some(file), Some(cycles)) => (file, cycles),
        _ => {
            eprintln!("usage: cycle FILE CYCLES");
            return ExitCode::from(2);
        }
    };
    match run(file, cycles) {
        Ok((total, median)) => {
            println!("{{\"cycles\":{cycles},\"ns\":{total},\"median_ns\":{median}}}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cycle: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Total and median per-cycle time in ns.
fn run(file: &str, cycles: u64) -> Result<(u128, u128), Box<dyn std::error::Error>> {
    let backing = OpenOptions::new().read(true).write(true).open(file)?;
    let ctl = LoopControl::open(None)?;
    let opts = ConfigureOptions::default();
    let mut each = Vec::with_capacity(cycles as usize);
    let start = Instant::now();
    for _ in 0..cycles {
        let t0 = Instant::now();
        let lo =
            ctl.loop_for_fd::<loopdev::Error, fn(&Loop) -> loopdev::Result<()>>(backing.as_fd(), &opts, false, None)?;
        lo.clear_fd()?;
        drop(lo);
        each.push(t0.elapsed().as_nanos());
    }
    let total = start.elapsed().as_nanos();
    each.sort_unstable();
    Ok((total, each[each.len() / 2]))
}
