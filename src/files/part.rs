//! The receiving side's file on disk: a partial file next to its state, written only with
//! checked chunks, resumable, and put in place under a name that overwrites nothing.
//!
//! In the download directory `dir`, a transfer of `name` writes `.{name}.{h}.peermesh-part`
//! (`h`: the first 16 hex digits of the file's SHA-256) and keeps `.{name}.{h}.peermesh-part.json`
//! (size, SHA-256 of the whole file, bytes verified) next to
//! it. Received names never start with a dot ([`safe_file_name`]), so these never clash with a
//! received file. An offer of the same name, size and whole-file hash continues from the
//! verified offset (the hash says the bytes are the same, whoever sends them).
//!
//! Blocking (std::fs): run it on a blocking thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::name::unused_path;
use super::wire::{FileErrorCode, Hash, HASH_LEN};

/// Write the state next to the data at least every this many bytes (and at the end).
pub const PERSIST_EVERY: u64 = 4 << 20;

/// Why a transfer failed at this end: the code for the peer, the text for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// For the CANCEL to the peer.
    pub code: FileErrorCode,
    /// For people.
    pub reason: String,
}

impl Failure {
    fn new(code: FileErrorCode, reason: impl Into<String>) -> Self {
        Failure {
            code,
            reason: reason.into(),
        }
    }

    /// An I/O error: a full disk (or quota) is `disk_full`, anything else `io`.
    pub fn io(what: &str, e: &io::Error) -> Self {
        let full = matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ) || e.raw_os_error() == Some(28); // ENOSPC where the kind is not mapped
        let code = if full {
            FileErrorCode::DiskFull
        } else {
            FileErrorCode::Io
        };
        Failure::new(code, format!("{what}: {e}"))
    }
}

/// The state kept next to a partial file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PartState {
    name: String,
    size: u64,
    /// Hex SHA-256 of the whole file, as offered.
    sha256: String,
    /// Bytes from the start that are written and were checked against their chunk's hash.
    verified: u64,
}

fn hex(h: &[u8]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A file being received.
pub struct PartFile {
    dir: PathBuf,
    data_path: PathBuf,
    state_path: PathBuf,
    file: File,
    state: PartState,
    /// Whole-file hash of the bytes below `state.verified`.
    hasher: Sha256,
    /// Whether a later offer may continue it (the sender knew the whole file's hash).
    resumable: bool,
    persisted: u64,
    /// Finished, abandoned or discarded: nothing left to do when dropped.
    ended: bool,
}

/// A partial file dropped without an end (an error on the way out, a task that was stopped)
/// is abandoned: kept for a resume if it can be resumed, removed otherwise.
impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.ended {
            self.ended = true;
            if self.resumable {
                let _ = self.persist();
            } else {
                self.discard();
            }
        }
    }
}

impl PartFile {
    /// The partial file of `name` with `sha256` in a download directory: the hash is in the
    /// name, so two different files of the same name never share one.
    pub fn part_name(name: &str, sha256: &Hash) -> String {
        format!(".{name}.{}.peermesh-part", &hex(sha256)[..16])
    }

    /// Start receiving `name` (already a safe name) of `size` bytes into `dir`, or continue a
    /// partial file of the same name, size and hash. `sha256` all zeros: the sender does not
    /// know the hash in advance, so nothing is resumed and nothing kept for later. The caller
    /// makes sure no other transfer uses the same partial file ([`PartFile::part_name`]) at
    /// the same time; if one does, [`PartFile::open_unshared`].
    pub fn open(dir: &Path, name: &str, size: u64, sha256: &Hash) -> Result<PartFile, Failure> {
        let resumable = sha256 != &[0; HASH_LEN];
        Self::open_as(dir, name, size, sha256, resumable)
    }

    /// Like [`PartFile::open`], into a partial file of its own that nothing else uses and that
    /// is not kept for a resume (another transfer of the same file is using the shared one).
    pub fn open_unshared(
        dir: &Path,
        name: &str,
        size: u64,
        sha256: &Hash,
    ) -> Result<PartFile, Failure> {
        Self::open_as(dir, name, size, sha256, false)
    }

    fn open_as(
        dir: &Path,
        name: &str,
        size: u64,
        sha256: &Hash,
        resumable: bool,
    ) -> Result<PartFile, Failure> {
        let part = if resumable {
            Self::part_name(name, sha256)
        } else {
            format!(".{name}.{:016x}.peermesh-part", rand::random::<u64>())
        };
        let data_path = dir.join(&part);
        let state_path = dir.join(format!("{part}.json"));
        let want = PartState {
            name: name.to_string(),
            size,
            sha256: hex(sha256),
            verified: 0,
        };
        let kept = resumable
            .then(|| std::fs::read(&state_path).ok())
            .flatten()
            .and_then(|b| serde_json::from_slice::<PartState>(&b).ok())
            .filter(|s| {
                s.name == want.name
                    && s.size == want.size
                    && s.sha256 == want.sha256
                    && s.verified <= s.size
            });
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)
            .map_err(|e| Failure::io("cannot create the partial file", &e))?;
        let mut state = want;
        let mut hasher = Sha256::new();
        if let Some(kept) = kept {
            // Hash the kept prefix again (the hash state is not stored); a shorter file than
            // the state says means the state is wrong: start over.
            let len = file
                .metadata()
                .map_err(|e| Failure::io("cannot read the partial file", &e))?
                .len();
            if len >= kept.verified {
                let mut left = kept.verified;
                let mut buf = vec![0; 1 << 20];
                file.seek(SeekFrom::Start(0))
                    .map_err(|e| Failure::io("cannot read the partial file", &e))?;
                while left > 0 {
                    let n = buf.len().min(left as usize);
                    file.read_exact(&mut buf[..n])
                        .map_err(|e| Failure::io("cannot read the partial file", &e))?;
                    hasher.update(&buf[..n]);
                    left -= n as u64;
                }
                state.verified = kept.verified;
            }
        }
        // Nothing past the verified prefix is trusted.
        file.set_len(state.verified)
            .and_then(|()| file.seek(SeekFrom::Start(state.verified)).map(|_| ()))
            .map_err(|e| Failure::io("cannot prepare the partial file", &e))?;
        let mut part = PartFile {
            dir: dir.to_path_buf(),
            data_path,
            state_path,
            file,
            persisted: state.verified,
            state,
            hasher,
            resumable,
            ended: false,
        };
        part.persist()?;
        Ok(part)
    }

    /// Bytes verified so far: where the sender continues (ACCEPT's offset).
    pub fn offset(&self) -> u64 {
        self.state.verified
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.state.size
    }

    /// A chunk: it must continue exactly at the verified offset, stay within the size, and
    /// match its hash. Returns whether the state was persisted (a good moment for VERIFIED).
    pub fn write_chunk(
        &mut self,
        offset: u64,
        sha256: &Hash,
        bytes: &[u8],
    ) -> Result<bool, Failure> {
        if offset != self.state.verified {
            return Err(Failure::new(
                FileErrorCode::Protocol,
                format!("chunk at {offset}, expected {}", self.state.verified),
            ));
        }
        let end = offset + bytes.len() as u64;
        if end > self.state.size {
            return Err(Failure::new(
                FileErrorCode::Protocol,
                format!("chunk ends at {end}, past the size {}", self.state.size),
            ));
        }
        if Sha256::digest(bytes)[..] != sha256[..] {
            return Err(Failure::new(
                FileErrorCode::HashMismatch,
                format!("chunk at {offset}: hash mismatch"),
            ));
        }
        self.file
            .write_all(bytes)
            .map_err(|e| Failure::io("cannot write the file", &e))?;
        self.hasher.update(bytes);
        self.state.verified = end;
        if end - self.persisted >= PERSIST_EVERY || end == self.state.size {
            self.persist()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Flush the data and record how much is verified (written to a temporary file and renamed
    /// over the state, so a crash leaves the old state or the new one).
    pub fn persist(&mut self) -> Result<(), Failure> {
        self.file
            .sync_data()
            .map_err(|e| Failure::io("cannot flush the file", &e))?;
        if self.resumable {
            let tmp = self.state_path.with_extension("json.tmp");
            let json = serde_json::to_vec(&self.state).expect("state serialises");
            std::fs::write(&tmp, json)
                .and_then(|()| std::fs::rename(&tmp, &self.state_path))
                .map_err(|e| Failure::io("cannot write the transfer state", &e))?;
        }
        self.persisted = self.state.verified;
        Ok(())
    }

    /// END: every byte is in and the whole file's hash is `sha256` (and the offered one, if
    /// there was one). The file goes in place under its name, or `name (1).ext` … if that
    /// exists (never overwritten); its path and hash are returned.
    pub fn finish(mut self, sha256: &Hash) -> Result<(PathBuf, Hash), Failure> {
        if self.state.verified != self.state.size {
            return Err(Failure::new(
                FileErrorCode::Protocol,
                format!(
                    "END after {} of {} bytes",
                    self.state.verified, self.state.size
                ),
            ));
        }
        let got: Hash = self.hasher.clone().finalize().into();
        let offered = self.resumable.then(|| self.state.sha256.clone());
        if &got != sha256 || offered.is_some_and(|o| o != hex(&got)) {
            // Nothing of it can be trusted for a later resume either.
            self.discard();
            return Err(Failure::new(
                FileErrorCode::HashMismatch,
                "the whole file's hash does not match",
            ));
        }
        self.persist()?;
        let target = unused_path(&self.dir, &self.state.name).ok_or_else(|| {
            Failure::new(
                FileErrorCode::Io,
                "no free name for the file in the directory",
            )
        })?;
        // No-clobber: a hard link fails if the target appeared meanwhile.
        std::fs::hard_link(&self.data_path, &target)
            .or_else(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
                // File systems without hard links: rename (the name was free a moment ago).
                std::fs::rename(&self.data_path, &target)
            })
            .map_err(|e| Failure::io("cannot put the file in place", &e))?;
        self.discard();
        Ok((target, got))
    }

    /// The transfer ended without the file. A resumable partial file stays for the next offer
    /// of the same file; any other is removed.
    pub fn abandon(self) {
        drop(self);
    }

    /// The transfer ended without the file and nothing of it is kept.
    pub fn discard(&mut self) {
        self.ended = true;
        let _ = std::fs::remove_file(&self.data_path);
        let _ = std::fs::remove_file(&self.state_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("peermesh-part-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn sha(b: &[u8]) -> Hash {
        Sha256::digest(b).into()
    }

    /// Write `data` in chunks of `chunk` from `from` up to `upto`.
    fn feed(p: &mut PartFile, data: &[u8], from: usize, upto: usize, chunk: usize) {
        let mut at = from;
        while at < upto {
            let end = (at + chunk).min(upto);
            p.write_chunk(at as u64, &sha(&data[at..end]), &data[at..end])
                .unwrap();
            at = end;
        }
    }

    #[test]
    fn a_file_arrives_checked_and_never_overwrites() {
        let d = dir("whole");
        let data = content(1 << 20);
        std::fs::write(d.join("a.bin"), b"already here").unwrap();
        let mut p = PartFile::open(&d, "a.bin", data.len() as u64, &sha(&data)).unwrap();
        assert_eq!(p.offset(), 0);
        feed(&mut p, &data, 0, data.len(), 100_000);
        let (path, hash) = p.finish(&sha(&data)).unwrap();
        assert_eq!(path, d.join("a (1).bin"));
        assert_eq!(hash, sha(&data));
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(std::fs::read(d.join("a.bin")).unwrap(), b"already here");
        // No partial files left.
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("peermesh-part"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_second_offer_continues_from_the_verified_offset() {
        let d = dir("resume");
        let data = content(10 << 20);
        let h = sha(&data);
        let mut p = PartFile::open(&d, "big.bin", data.len() as u64, &h).unwrap();
        feed(&mut p, &data, 0, 6 << 20, 256 << 10);
        // The process dies here (no drop runs): what was persisted survives (PERSIST_EVERY =
        // 4 MiB), and bytes written after it are not trusted.
        std::mem::forget(p);
        let mut p = PartFile::open(&d, "big.bin", data.len() as u64, &h).unwrap();
        assert_eq!(p.offset(), PERSIST_EVERY);
        feed(&mut p, &data, PERSIST_EVERY as usize, data.len(), 256 << 10);
        let (path, _) = p.finish(&h).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);

        // A different file of the same name starts over.
        let other = content(5 << 20);
        let mut p = PartFile::open(&d, "x.bin", other.len() as u64, &sha(&other)).unwrap();
        feed(&mut p, &other, 0, 4 << 20, 1 << 20);
        p.abandon();
        let changed = content((5 << 20) + 1);
        let p = PartFile::open(&d, "x.bin", changed.len() as u64, &sha(&changed)).unwrap();
        assert_eq!(p.offset(), 0);
        p.abandon();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_chunks_and_a_bad_whole_are_refused() {
        let d = dir("bad");
        let data = content(1000);
        let h = sha(&data);
        let mut p = PartFile::open(&d, "f", 1000, &h).unwrap();
        let e = p.write_chunk(0, &sha(b"other"), &data[..10]).unwrap_err();
        assert_eq!(e.code, FileErrorCode::HashMismatch);
        let e = p
            .write_chunk(5, &sha(&data[5..10]), &data[5..10])
            .unwrap_err();
        assert_eq!(e.code, FileErrorCode::Protocol);
        let e = p.write_chunk(0, &sha(&[0; 1001]), &[0; 1001]).unwrap_err();
        assert_eq!(e.code, FileErrorCode::Protocol);
        feed(&mut p, &data, 0, 500, 100);
        let e = p.finish(&h).unwrap_err();
        assert_eq!(
            e.code,
            FileErrorCode::Protocol,
            "a truncated file is never complete"
        );

        // Every chunk fine, but not the file that was offered: nothing is kept.
        let mut p = PartFile::open(&d, "g", 1000, &sha(b"something else")).unwrap();
        feed(&mut p, &data, 0, 1000, 300);
        let e = p.finish(&h).unwrap_err();
        assert_eq!(e.code, FileErrorCode::HashMismatch);
        assert!(!d.join("g").exists());
        // (The truncated "f" keeps its verified part for a resume; "g" keeps nothing.)
        let parts = || {
            std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.contains("peermesh-part") && !n.starts_with(".f."))
                .collect::<Vec<_>>()
        };
        assert!(parts().is_empty(), "{:?}", parts());

        // A stream (hash unknown in advance): nothing kept when it ends early.
        let mut p = PartFile::open(&d, "s", 1000, &[0; HASH_LEN]).unwrap();
        feed(&mut p, &data, 0, 500, 100);
        p.abandon();
        assert!(parts().is_empty(), "{:?}", parts());

        // Two files of the same name at once: each has its own partial file.
        let other: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
        let mut a = PartFile::open(&d, "same", 1000, &h).unwrap();
        let mut b = PartFile::open(&d, "same", 1000, &sha(&other)).unwrap();
        let mut c = PartFile::open_unshared(&d, "same", 1000, &h).unwrap();
        feed(&mut a, &data, 0, 1000, 300);
        feed(&mut b, &other, 0, 1000, 300);
        feed(&mut c, &data, 0, 1000, 300);
        let (pa, _) = a.finish(&h).unwrap();
        let (pb, _) = b.finish(&sha(&other)).unwrap();
        let (pc, _) = c.finish(&h).unwrap();
        assert_eq!(std::fs::read(pa).unwrap(), data);
        assert_eq!(std::fs::read(pb).unwrap(), other);
        assert_eq!(std::fs::read(pc).unwrap(), data);
        assert!(parts().is_empty(), "{:?}", parts());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
