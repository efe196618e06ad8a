//! A link between this host and a network namespace that the test shapes and cuts: delay,
//! loss, a rate, and cuts. The kernels we test on may lack `sch_netem` (this one is built
//! without CONFIG_NET_SCH_NETEM, so `tc qdisc add … netem` says "unknown qdisc"), so the link
//! is a pair of TUN devices with a forwarder between them in this process, doing per packet
//! what netem does: every IP packet crosses it, so TCP sees the delay, the loss and the rate
//! on the same path, as over a real poor link.
//!
//! Host side `cnhN` (10.77.N.1) and namespace side `cnnN` (10.77.N.2, in namespace
//! `cairn-upN`), point to point.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the link behaves now (both directions).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// One-way delay.
    pub delay: Duration,
    /// Probability (0..1) that a packet is dropped.
    pub loss: f64,
    /// Bits per second; 0 is unlimited.
    pub rate: u64,
    /// Everything dropped: the cable pulled somewhere upstream (no reset, no error).
    pub cut: bool,
}

pub struct Link {
    pub namespace: String,
    pub host_if: String,
    pub host_addr: String,
    pub remote_addr: String,
    shape: Arc<Mutex<Shape>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

fn tun(name: &str) -> Result<OwnedFd, String> {
    let path = std::ffi::CString::new("/dev/net/tun").unwrap();
    // SAFETY: a plain open of a device node; the fd is owned below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!("/dev/net/tun: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads an ifreq, which `request` is laid out as.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut request) };
    if result < 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(fd)
}

impl Link {
    /// Makes the namespace and the link, or says why it cannot (not root, no TUN, no `ip`).
    pub fn create() -> Result<Link, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("not root".into());
        }
        let n = std::process::id() % 200 + 20;
        let namespace = format!("cairn-up{n}");
        let (host_if, remote_if) = (format!("cnh{n}"), format!("cnn{n}"));
        let (host_addr, remote_addr) = (format!("10.77.{n}.1"), format!("10.77.{n}.2"));
        let _ = ip(&["netns", "del", &namespace]);
        ip(&["netns", "add", &namespace])?;
        let host = tun(&host_if)?;
        let remote = tun(&remote_if)?;
        ip(&["link", "set", &remote_if, "netns", &namespace])?;
        ip(&[
            "addr",
            "add",
            &host_addr,
            "peer",
            &remote_addr,
            "dev",
            &host_if,
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &namespace,
            "addr",
            "add",
            &remote_addr,
            "peer",
            &host_addr,
            "dev",
            &remote_if,
        ])?;
        ip(&["-n", &namespace, "link", "set", &remote_if, "up"])?;
        ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        let shape = Arc::new(Mutex::new(Shape::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let host = Arc::new(host);
        let remote = Arc::new(remote);
        let threads = vec![
            forward(
                Arc::clone(&host),
                Arc::clone(&remote),
                Arc::clone(&shape),
                Arc::clone(&stop),
            ),
            forward(remote, host, Arc::clone(&shape), Arc::clone(&stop)),
        ];
        Ok(Link {
            namespace,
            host_if,
            host_addr,
            remote_addr,
            shape,
            stop,
            threads,
        })
    }

    pub fn set(&self, shape: Shape) {
        *self.shape.lock().unwrap() = shape;
    }

    pub fn clear(&self) {
        self.set(Shape::default());
    }

    /// The host side's interface down (sends fail at once) or up again.
    pub fn interface(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.host_if, state]).unwrap();
        if up {
            // Bringing the interface up again drops its address's route; put it back.
            let _ = ip(&[
                "addr",
                "add",
                &self.host_addr,
                "peer",
                &self.remote_addr,
                "dev",
                &self.host_if,
            ]);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let _ = ip(&["netns", "del", &self.namespace]);
    }
}

/// Moves packets from `from` to `to` as `shape` says: each is dropped (loss, cut) or queued
/// to leave after the delay and its share of the rate, in order; the queue holds at most
/// 256 KiB (a router's buffer: more is dropped at the tail).
fn forward(
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    shape: Arc<Mutex<Shape>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        let mut queued = 0usize;
        let mut line_free = Instant::now();
        let mut seed: u64 = (std::process::id() as u64) << 32 | from.as_raw_fd() as u64 | 1;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let mut buffer = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            while queue.front().is_some_and(|(due, _)| *due <= now) {
                let (_, packet) = queue.pop_front().unwrap();
                queued -= packet.len();
                // SAFETY: writing a buffer we own to an fd we hold.
                unsafe { libc::write(to.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
            }
            let wait = queue
                .front()
                .map(|(due, _)| due.saturating_duration_since(now))
                .unwrap_or(Duration::from_millis(50))
                .min(Duration::from_millis(50));
            let mut poll = libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, owned here.
            let ready = unsafe { libc::poll(&mut poll, 1, wait.as_millis().max(1) as i32) };
            if ready <= 0 {
                continue;
            }
            loop {
                // SAFETY: reading into a buffer we own from an fd we hold.
                let read = unsafe {
                    libc::read(from.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len())
                };
                if read <= 0 {
                    break;
                }
                let packet = buffer[..read as usize].to_vec();
                let shape = *shape.lock().unwrap();
                if shape.cut || random() < shape.loss || queued + packet.len() > 256 << 10 {
                    continue;
                }
                let now = Instant::now();
                let leaves = if shape.rate > 0 {
                    let serialise =
                        Duration::from_secs_f64(packet.len() as f64 * 8.0 / shape.rate as f64);
                    line_free = line_free.max(now) + serialise;
                    line_free
                } else {
                    now
                };
                queued += packet.len();
                queue.push_back((leaves + shape.delay, packet));
            }
        }
    })
}
