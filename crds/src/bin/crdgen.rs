//! Writes the CRD YAML files generated from the API types.
//!
//! `crdgen [DIR]` writes `DIR/<group>_<plural>.yaml` (default: the `crds/`
//! directory of this repository); `crdgen --check [DIR]` exits 1 and names
//! each file that differs from the types.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut check = false;
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for arg in std::env::args().skip(1) {
        if arg == "--check" {
            check = true;
        } else if arg.starts_with('-') {
            eprintln!("crdgen: unknown option {arg}; usage: crdgen [--check] [DIR]");
            return ExitCode::from(2);
        } else {
            dir = PathBuf::from(arg);
        }
    }
    let files = match kubevmm_crds::crd::rendered() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = 0;
    for (name, text) in files {
        let path = dir.join(&name);
        if check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                eprintln!("crdgen: {} is out of date; run `make crds`", path.display());
                stale += 1;
            }
        } else if let Err(e) = std::fs::write(&path, text) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {}", path.display());
        }
    }
    if stale > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
