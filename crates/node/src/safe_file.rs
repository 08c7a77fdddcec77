//! Files the CLI and the daemon create (process images, cluster keys) where others may write
//! too: created without following any symlink, with an exact mode, invisible until complete.
//!
//! The directory is resolved once and everything after is relative to its fd. The new file is
//! an unnamed O_TMPFILE in that directory (or, where the filesystem has none, a fresh random
//! name made with O_CREAT|O_EXCL|O_NOFOLLOW); its mode is set with fchmod (the umask cannot
//! narrow or widen it), its owner with fchown. `commit` syncs it, links it in under a random
//! name and renames that over the final name: rename replaces a symlink or another file found
//! there — the directory entry, never what it points to — or, without `replace`, the file is
//! linked in and an existing name refuses. A `NewFile` dropped before `commit` leaves nothing
//! behind (an O_TMPFILE vanishes with its last fd; a named one is unlinked), and a process
//! killed while writing leaves nothing either where the filesystem has O_TMPFILE.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::Errno;

/// A file being written, not yet at its path.
pub struct NewFile {
    dir: OwnedFd,
    name: OsString,
    path: PathBuf,
    file: File,
    /// The name it has in the directory before `commit` renames it, if it has one.
    named_tmp: Option<OsString>,
}

impl NewFile {
    /// Starts the file that `commit` will put at `path`, with permissions `mode` (e.g. 0o600).
    pub fn create(path: &Path, mode: u32) -> Result<NewFile> {
        Self::create_as(path, mode, true)
    }

    /// `create`, with `tmpfile` false as on a filesystem without O_TMPFILE.
    fn create_as(path: &Path, mode: u32, tmpfile: bool) -> Result<NewFile> {
        let dir_path =
            path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = match path.file_name() {
            Some(n) if !path.as_os_str().as_bytes().ends_with(b"/") => n.to_os_string(),
            _ => bail!("{} does not name a file", path.display()),
        };
        let dir = rustix::fs::openat(
            CWD,
            dir_path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("opening directory {}", dir_path.display()))?;
        let creating = || format!("creating {} in {}", path.display(), dir_path.display());
        let want = Mode::from_raw_mode(mode);
        let unnamed = if tmpfile {
            rustix::fs::openat(&dir, ".", OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC, want)
        } else {
            Err(Errno::OPNOTSUPP)
        };
        let (fd, named_tmp) = match unnamed {
            Ok(fd) => (fd, None),
            // No O_TMPFILE on this filesystem (or kernel): a fresh name nobody can have planted.
            Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                let mut tries = 0;
                loop {
                    let tmp = random_name();
                    match rustix::fs::openat(
                        &dir,
                        &tmp,
                        OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::WRONLY
                            | OFlags::CLOEXEC,
                        want,
                    ) {
                        Ok(fd) => break (fd, Some(tmp)),
                        Err(Errno::EXIST) if tries < 16 => tries += 1,
                        Err(e) => return Err(e).with_context(creating),
                    }
                }
            }
            Err(e) => return Err(e).with_context(creating),
        };
        let f = NewFile { dir, name, path: path.to_path_buf(), file: File::from(fd), named_tmp };
        // (The umask may have narrowed the mode given at creation.)
        rustix::fs::fchmod(&f.file, want).with_context(creating)?;
        Ok(f)
    }

    /// The file, to write to (`&File` is `Write`; `try_clone` gives an owned handle).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Gives the file to `uid`:`gid` (needs privilege unless they are the caller's own).
    pub fn set_owner(&self, uid: u32, gid: u32) -> Result<()> {
        let st = rustix::fs::fstat(&self.file)
            .with_context(|| format!("reading the owner of new {}", self.path.display()))?;
        if (st.st_uid, st.st_gid) == (uid, gid) {
            return Ok(());
        }
        rustix::fs::fchown(
            &self.file,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )
        .with_context(|| format!("giving {} to uid {uid} gid {gid}", self.path.display()))
    }

    /// Syncs the file and puts it at its path, atomically: with `replace`, over whatever entry
    /// is there (a symlink there is replaced, not followed); without, refusing if the name exists.
    pub fn commit(mut self, replace: bool) -> Result<()> {
        let placing = format!("putting {} in place", self.path.display());
        self.file.sync_all().with_context(|| format!("syncing {} to disk", self.path.display()))?;
        if !replace {
            let linked = match &self.named_tmp {
                None => link_unnamed(&self.file, &self.dir, &self.name),
                Some(tmp) => {
                    rustix::fs::linkat(&self.dir, tmp, &self.dir, &self.name, AtFlags::empty())
                }
            };
            match linked {
                Err(Errno::EXIST) => bail!("{} already exists", self.path.display()),
                r => r.context(placing.clone())?,
            }
        } else {
            if self.named_tmp.is_none() {
                let mut tries = 0;
                loop {
                    let tmp = random_name();
                    match link_unnamed(&self.file, &self.dir, &tmp) {
                        Ok(()) => {
                            self.named_tmp = Some(tmp);
                            break;
                        }
                        Err(Errno::EXIST) if tries < 16 => tries += 1,
                        Err(e) => return Err(e).context(placing),
                    }
                }
            }
            let tmp = self.named_tmp.as_ref().expect("named above");
            rustix::fs::renameat(&self.dir, tmp, &self.dir, &self.name).context(placing.clone())?;
            self.named_tmp = None;
        }
        rustix::fs::fsync(&self.dir)
            .with_context(|| format!("syncing the directory of {}", self.path.display()))?;
        // In a directory others may write without the sticky bit, they could have swapped the
        // entry meanwhile: say so rather than report a file that is not ours.
        let ours = rustix::fs::fstat(&self.file).context(placing.clone())?;
        match rustix::fs::statat(&self.dir, &self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino) => {}
            _ => bail!("{} was replaced by someone else while being put in place (its directory is writable by others)", self.path.display()),
        }
        // (A named temporary that was linked without replace goes in drop.)
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if let Some(tmp) = &self.named_tmp {
            let _ = rustix::fs::unlinkat(&self.dir, tmp, AtFlags::empty());
        }
    }
}

/// Writes `data` as a new file at `path` with `mode` (see `NewFile`).
pub fn write_file(path: &Path, data: &[u8], mode: u32, replace: bool) -> Result<()> {
    let f = NewFile::create(path, mode)?;
    f.file().write_all(data).with_context(|| format!("writing {}", path.display()))?;
    f.commit(replace)
}

/// Links an O_TMPFILE into `dir` as `name`: through its fd (needs CAP_DAC_READ_SEARCH), else
/// through /proc/self/fd.
fn link_unnamed(file: &File, dir: &OwnedFd, name: &OsStr) -> rustix::io::Result<()> {
    match rustix::fs::linkat(file, "", dir, name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM) => rustix::fs::linkat(
            CWD,
            format!("/proc/self/fd/{}", file.as_raw_fd()),
            dir,
            name,
            AtFlags::SYMLINK_FOLLOW,
        ),
        r => r,
    }
}

/// A hidden name nobody can predict (std's per-process random hash keys).
fn random_name() -> OsString {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    OsString::from(format!(".telefork-{:016x}.tmp", h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn replaces_a_symlink_without_following_it_and_leaves_nothing_on_drop() {
        for tmpfile in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let victim = d.path().join("victim");
            std::fs::write(&victim, "precious").unwrap();
            let out = d.path().join("out");
            std::os::unix::fs::symlink(&victim, &out).unwrap();
            let f = NewFile::create_as(&out, 0o600, tmpfile).unwrap();
            f.file().write_all(b"new").unwrap();
            f.commit(true).unwrap();
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
            let md = std::fs::symlink_metadata(&out).unwrap();
            assert!(md.file_type().is_file());
            assert_eq!(md.permissions().mode() & 0o7777, 0o600);
            assert_eq!(md.uid(), nix::unistd::geteuid().as_raw());
            assert_eq!(std::fs::read(&out).unwrap(), b"new");

            // Without replace, an existing name (even a dangling symlink) refuses.
            let dangling = d.path().join("dangling");
            std::os::unix::fs::symlink(d.path().join("nowhere"), &dangling).unwrap();
            let f = NewFile::create_as(&dangling, 0o600, tmpfile).unwrap();
            let e = f.commit(false).unwrap_err().to_string();
            assert!(e.contains("already exists"), "{e}");
            assert!(!d.path().join("nowhere").exists());
            let f = NewFile::create_as(&d.path().join("fresh"), 0o644, tmpfile).unwrap();
            f.commit(false).unwrap();
            assert_eq!(
                std::fs::metadata(d.path().join("fresh")).unwrap().permissions().mode() & 0o7777,
                0o644
            );

            // Dropped before commit: nothing left.
            let f = NewFile::create_as(&d.path().join("never"), 0o600, tmpfile).unwrap();
            f.file().write_all(b"partial").unwrap();
            drop(f);
            let mut names: Vec<_> =
                std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            names.sort();
            assert_eq!(names, ["dangling", "fresh", "out", "victim"], "O_TMPFILE: {tmpfile}");
        }
    }
}
