//! A small tmpfs for tests of what happens when the disk is full.

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// A tmpfs of a few hundred KiB, unmounted on drop.
pub(crate) struct SmallFs(tempfile::TempDir);

impl SmallFs {
    /// `None`, after saying so loudly, when this process may not mount.
    pub(crate) fn mount(test: &str, kib: u64) -> Option<Self> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED {test}: mounting a small tmpfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // A system call, not the `mount` program: a child process would
        // hold copies of other tests' lock descriptors until it execs.
        let options = format!("size={kib}k,mode=0700");
        match nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        ) {
            Ok(()) => Some(Self(dir)),
            Err(e) => {
                eprintln!("SKIPPED {test}: cannot mount a tmpfs: {e}");
                None
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }

    pub(crate) fn free(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(self.path()).unwrap();
        s.blocks_available() * s.fragment_size()
    }

    /// Writes a file of `len` bytes (or as much as fits).
    pub(crate) fn fill(&self, name: &str, len: u64) {
        let mut f = File::create(self.path().join(name)).unwrap();
        let chunk = vec![b'x'; 4096];
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left.min(4096)).unwrap();
            if f.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}
