//! Builds the test guests in guest-images/ with GNU as and ld, and embeds
//! them in the twinvm binary (`--kernel builtin:NAME`) with the one-line
//! description each guest's first line gives (`# NAME: description`).

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {what} ({cmd:?}): {e}; install binutils"));
    assert!(status.success(), "{what} failed: {cmd:?}");
}

/// The guest's one-line description: its first line must read
/// `# NAME: description`.
fn description(path: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let first = text.lines().next().unwrap_or("");
    let description = first
        .strip_prefix(&format!("# {name}: "))
        .map(str::trim)
        .unwrap_or("");
    assert!(
        !description.is_empty(),
        "{}: the first line must be `# {name}: one-line description`, found {first:?}",
        path.display()
    );
    description.to_string()
}

fn main() {
    let src = Path::new("guest-images");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    // The directory too, so a new guest is picked up.
    println!("cargo:rerun-if-changed=guest-images");
    println!("cargo:rerun-if-changed=guest-images/linker.ld");
    println!("cargo:rerun-if-changed=guest-images/rt.S");
    let mut names: Vec<String> = std::fs::read_dir(src)
        .expect("guest-images/")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".S") && n != "rt.S")
        .map(|n| n.trim_end_matches(".S").to_string())
        .collect();
    names.sort();
    let mut table = String::from(
        "/// Test guests built from guest-images/.\npub const GUESTS: &[Guest] = &[\n",
    );
    for name in &names {
        println!("cargo:rerun-if-changed=guest-images/{name}.S");
        let description = description(&src.join(format!("{name}.S")), name);
        let obj = out.join(format!("{name}.o"));
        let elf = out.join(format!("{name}.elf"));
        run(
            Command::new("as")
                .args(["--64", "-I"])
                .arg(src)
                .arg("-o")
                .arg(&obj)
                .arg(src.join(format!("{name}.S"))),
            "as",
        );
        run(
            Command::new("ld")
                .args([
                    "-m",
                    "elf_x86_64",
                    "-static",
                    "-nostdlib",
                    "--build-id=none",
                    "-z",
                    "max-page-size=0x1000",
                    "--no-warn-rwx-segments",
                    "-T",
                ])
                .arg(src.join("linker.ld"))
                .arg("-o")
                .arg(&elf)
                .arg(&obj),
            "ld",
        );
        writeln!(
            table,
            "    Guest {{ name: {name:?}, description: {description:?}, image: include_bytes!({:?}) }},",
            elf.display().to_string()
        )
        .unwrap();
    }
    table.push_str("];\n");
    std::fs::write(out.join("guests.rs"), table).expect("write guests.rs");
}
