//! A command component: it exports `wasi:cli/run` and nothing else. cairn refuses to deploy it
//! as an HTTP app (saying which export is missing) and runs it as a command app
//! (`cairnctl run`, `[[schedule]]`). What it does is chosen by its arguments:
//!
//! - (none)             prints a line and exits 0
//! - `hello`            prints its arguments and `$GREETING` to stdout, a line to stderr
//! - `exit N`           exits with code N
//! - `lines N MS`       prints N numbered lines, MS milliseconds apart
//! - `sleep MS`         sleeps, then prints `slept`
//! - `flood S`          prints 6 KiB every 10 ms for S seconds (600 KiB/s, within the
//!                      default log rate), then `flooded`
//! - `spin`             runs on without end (its timeout stops it)
//! - `trap`             panics (a trap)
//! - `config KEY`       prints the `wasi:config` value of KEY
//! - `count`            adds one to `runs` in the app's key-value store and prints the total
//! - `log MESSAGE`      logs MESSAGE through `wasi:logging` at warn

mod host {
    wit_bindgen::generate!({
        path: "../../../wit/host",
        world: "cairn:host/host",
        generate_all,
    });
}

use host::wasi::config0_2_0_draft::store as config;
use host::wasi::keyvalue::{atomics, store as kv};
use host::wasi::logging::logging::{self, Level};
use std::io::Write;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let number = |i: usize| arg(i).parse::<u64>().unwrap_or(0);
    match arg(1) {
        "" => println!("this component has no HTTP handler"),
        "hello" => {
            println!(
                "hello from {} args={:?} GREETING={}",
                arg(0),
                &args[1..],
                std::env::var("GREETING").unwrap_or_default()
            );
            eprintln!("a line to stderr");
        }
        "exit" => std::process::exit(number(2) as i32),
        "lines" => {
            for line in 1..=number(2) {
                println!("line {line}");
                std::io::stdout().flush().unwrap();
                std::thread::sleep(Duration::from_millis(number(3)));
            }
        }
        "sleep" => {
            std::thread::sleep(Duration::from_millis(number(2)));
            println!("slept");
        }
        "flood" => {
            let chunk = format!("{}\n", "f".repeat(6 * 1024 - 1));
            for _ in 0..number(2) * 100 {
                print!("{chunk}");
                std::io::stdout().flush().unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            println!("flooded");
        }
        "spin" => {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "trap" => panic!("asked to trap"),
        "config" => match config::get(arg(2)) {
            Ok(Some(value)) => println!("{value}"),
            Ok(None) => {
                eprintln!("no config key {}", arg(2));
                std::process::exit(1);
            }
            Err(error) => {
                eprintln!("config error: {error:?}");
                std::process::exit(1);
            }
        },
        "count" => {
            let total = kv::open("")
                .and_then(|bucket| atomics::increment(&bucket, "runs", 1))
                .unwrap_or_else(|error| {
                    eprintln!("key-value error: {error:?}");
                    std::process::exit(1)
                });
            println!("runs: {total}");
        }
        "log" => logging::log(Level::Warn, "job", arg(2)),
        other => {
            eprintln!("unknown command {other}");
            std::process::exit(2);
        }
    }
}
