//! `node-vmm console-log`: a VM's serial console from its console ring on
//! this node (what `kubectl vm logs` shows through the API), for
//! operators and scripts on the node.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use kubevmm_vmm::ring::{RingError, RingReader};

/// How often `--follow` looks for new output.
const POLL: Duration = Duration::from_millis(200);
/// The most a follow step reads at once.
const STEP: usize = 1 << 20;

/// The ring of `path`: the file itself, or `console.ring` in a VM's
/// state directory.
fn ring_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("console.ring")
    } else {
        path.to_path_buf()
    }
}

fn write_out(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()
}

/// Prints the ring (or its last `tail` lines), then with `follow` what the
/// guest writes next, until interrupted. A ring re-created under it (a
/// corrupt one replaced by the VMM) is read again from its start.
pub fn run(path: &Path, tail: Option<usize>, follow: bool) -> ExitCode {
    let path = ring_path(path);
    match print(&path, tail, follow) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed stdout (`| head`) is the reader's choice.
        Err(Failure::Out(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(Failure::Out(e)) => {
            eprintln!("node-vmm console-log: cannot write the output: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Ring(e @ RingError::Open { .. })) => {
            eprintln!("node-vmm console-log: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Ring(e)) => {
            eprintln!("node-vmm console-log: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Ring(RingError),
    Out(std::io::Error),
}

fn print(path: &Path, tail: Option<usize>, follow: bool) -> Result<(), Failure> {
    let mut reader = RingReader::open(path).map_err(Failure::Ring)?;
    let first = match tail {
        Some(n) => reader.tail_lines(n),
        None => reader.read_from(0, usize::MAX),
    }
    .map_err(Failure::Ring)?;
    write_out(&first.bytes).map_err(Failure::Out)?;
    if !follow {
        return Ok(());
    }
    let mut next = first.next;
    loop {
        std::thread::sleep(POLL);
        match reader.read_from(next, STEP) {
            Ok(c) => {
                if c.skipped > 0 {
                    eprintln!(
                        "node-vmm console-log: {} bytes of output were overwritten before they could be read",
                        c.skipped
                    );
                }
                write_out(&c.bytes).map_err(Failure::Out)?;
                next = c.next;
            }
            Err(RingError::Recreated | RingError::OffsetAhead { .. }) => {
                eprintln!("node-vmm console-log: the console ring was re-created; reading it from its start");
                reader = RingReader::open(path).map_err(Failure::Ring)?;
                next = 0;
            }
            Err(e) => return Err(Failure::Ring(e)),
        }
    }
}
