//! Whether the workflow program can be started at all, checked the way
//! the kernel will start it: the program found as `execvp` finds it, an
//! executable file, and, for a script, an interpreter named by its `#!`
//! line that exists and is executable. A script saved with CRLF line
//! endings names an interpreter ending in `\r`, which the kernel reports
//! as "No such file or directory" for a file that exists; it is named as
//! such here.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::process;

/// Why the workflow program cannot be started, in words that say what to
/// do; `program` is `workflow.command[0]` as configured.
pub fn check_program(program: &str) -> Result<PathBuf, String> {
    let path = match process::resolve_program(program) {
        Ok(path) => path,
        Err(e) if program.contains('/') => {
            return Err(match std::fs::metadata(program) {
                Ok(meta) if meta.is_dir() => format!("{program} is a directory"),
                Ok(_) => format!(
                    "{program} is not executable (chmod +x {program}, or name its interpreter \
                     first, e.g. [\"bash\", \"{program}\"])"
                ),
                Err(_) => format!("{program} does not exist ({e})"),
            });
        }
        Err(_) => {
            return Err(format!(
                "{program:?} is not found on PATH (give its absolute path, or a path relative \
                 to the config file's folder)"
            ));
        }
    };
    check_interpreter(&path)?;
    Ok(path)
}

/// The `#!` line of a script: its interpreter must exist and be
/// executable (`/usr/bin/env NAME` must find NAME on `PATH`).
fn check_interpreter(path: &Path) -> Result<(), String> {
    let mut head = [0u8; 256];
    let n = std::fs::File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .map_err(|e| format!("{}: cannot read it: {e}", path.display()))?;
    let head = &head[..n];
    let Some(rest) = head.strip_prefix(b"#!") else {
        return Ok(());
    };
    let line = rest.split(|b| *b == b'\n').next().unwrap_or_default();
    if line.ends_with(b"\r") {
        return Err(format!(
            "{} was saved with CRLF (Windows) line endings: its #! line names an interpreter \
             ending in a carriage return, which cannot be found (convert it, e.g. \
             `sed -i 's/\\r$//' {}`)",
            path.display(),
            path.display()
        ));
    }
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let Some(interpreter) = words.next() else {
        return Err(format!(
            "{}: its #! line names no interpreter",
            path.display()
        ));
    };
    let found = is_executable_file(Path::new(interpreter));
    if !found {
        return Err(format!(
            "{}: its interpreter {interpreter} (from the #! line) does not exist or is not \
             executable",
            path.display()
        ));
    }
    if Path::new(interpreter)
        .file_name()
        .is_some_and(|n| n == "env")
    {
        // `env -S ...` and options: the first word that is not an option.
        if let Some(name) = words.find(|w| !w.starts_with('-'))
            && !name.contains('=')
            && process::resolve_program(name).is_err()
        {
            return Err(format!(
                "{}: its #! line runs {name:?} through env, and {name:?} is not found on PATH",
                path.display()
            ));
        }
    }
    Ok(())
}

fn read_up_to(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, text: &str, mode: u32) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.to_str().unwrap().to_owned()
    }

    #[test]
    fn a_good_script_and_a_program_on_path_pass() {
        let dir = tempfile::tempdir().unwrap();
        let ok = script(dir.path(), "ok.sh", "#!/bin/sh\necho hi\n", 0o755);
        assert!(check_program(&ok).is_ok());
        let env = script(dir.path(), "env.sh", "#!/usr/bin/env sh\necho hi\n", 0o755);
        assert!(check_program(&env).is_ok());
        assert!(check_program("true").is_ok());
    }

    #[test]
    fn each_reason_a_workflow_cannot_start_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.sh");
        let err = check_program(missing.to_str().unwrap()).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        let plain = script(dir.path(), "plain.sh", "#!/bin/sh\n", 0o644);
        let err = check_program(&plain).unwrap_err();
        assert!(err.contains("chmod +x"), "{err}");
        let err = check_program("claude-flow-no-such-program").unwrap_err();
        assert!(err.contains("not found on PATH"), "{err}");
        let crlf = script(dir.path(), "crlf.sh", "#!/bin/sh\r\necho hi\r\n", 0o755);
        let err = check_program(&crlf).unwrap_err();
        assert!(err.contains("CRLF"), "{err}");
        let nointerp = script(dir.path(), "ni.sh", "#!/no/such/bash\n", 0o755);
        let err = check_program(&nointerp).unwrap_err();
        assert!(err.contains("/no/such/bash"), "{err}");
        let noenv = script(dir.path(), "ne.sh", "#!/usr/bin/env no-such-tool\n", 0o755);
        let err = check_program(&noenv).unwrap_err();
        assert!(err.contains("no-such-tool"), "{err}");
    }
}
