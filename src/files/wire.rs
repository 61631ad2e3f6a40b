//! File-transfer messages (`docs/PROTOCOL.md` §8.9): each one reliable message on the file lane
//! of a link. Plain data with an encoder and a decoder that returns a typed error for bad input
//! and never panics.

/// Length of a SHA-256 digest.
pub const HASH_LEN: usize = 32;

/// Largest file bytes in one CHUNK.
pub const MAX_CHUNK: usize = 256 << 10;

/// Largest file name in an OFFER, and reason text in REJECT / CANCEL (bytes of UTF-8).
pub const MAX_TEXT: usize = 1024;

/// A SHA-256 digest.
pub type Hash = [u8; HASH_LEN];

/// Message kinds.
pub mod kind {
    /// Sender → receiver: a file is offered.
    pub const OFFER: u8 = 0x01;
    /// Receiver → sender: send from `offset`.
    pub const ACCEPT: u8 = 0x02;
    /// Receiver → sender: not wanted.
    pub const REJECT: u8 = 0x03;
    /// Sender → receiver: file bytes at `offset`, with their hash.
    pub const CHUNK: u8 = 0x04;
    /// Receiver → sender: everything below `offset` is written and checked.
    pub const VERIFIED: u8 = 0x05;
    /// Sender → receiver: no more chunks; the whole file's hash.
    pub const END: u8 = 0x06;
    /// Receiver → sender: the file is complete, its hash matched, and it is in place.
    pub const DONE: u8 = 0x07;
    /// Either side: the transfer ends without the file.
    pub const CANCEL: u8 = 0x08;
}

/// Why a transfer ended without the file (REJECT and CANCEL), on the wire as one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileErrorCode {
    /// The receiver did not want it.
    Rejected,
    /// One side cancelled.
    Cancelled,
    /// Reading or writing the file failed.
    Io,
    /// The receiver's disk is full.
    DiskFull,
    /// Larger than the receiver takes.
    TooLarge,
    /// A chunk's or the whole file's hash did not match its bytes.
    HashMismatch,
    /// The other side broke the file-transfer rules (bad offsets, sizes, order).
    Protocol,
    /// A code this version does not know.
    Other(u8),
}

impl FileErrorCode {
    /// The byte on the wire.
    pub fn to_u8(self) -> u8 {
        match self {
            FileErrorCode::Rejected => 1,
            FileErrorCode::Cancelled => 2,
            FileErrorCode::Io => 3,
            FileErrorCode::DiskFull => 4,
            FileErrorCode::TooLarge => 5,
            FileErrorCode::HashMismatch => 6,
            FileErrorCode::Protocol => 7,
            FileErrorCode::Other(b) => b,
        }
    }

    /// From the byte on the wire.
    pub fn from_u8(b: u8) -> Self {
        match b {
            1 => FileErrorCode::Rejected,
            2 => FileErrorCode::Cancelled,
            3 => FileErrorCode::Io,
            4 => FileErrorCode::DiskFull,
            5 => FileErrorCode::TooLarge,
            6 => FileErrorCode::HashMismatch,
            7 => FileErrorCode::Protocol,
            b => FileErrorCode::Other(b),
        }
    }

    /// Stable name (`rejected`, `cancelled`, `io`, `disk_full`, `too_large`, `hash_mismatch`,
    /// `protocol`, `other`).
    pub fn as_str(self) -> &'static str {
        match self {
            FileErrorCode::Rejected => "rejected",
            FileErrorCode::Cancelled => "cancelled",
            FileErrorCode::Io => "io",
            FileErrorCode::DiskFull => "disk_full",
            FileErrorCode::TooLarge => "too_large",
            FileErrorCode::HashMismatch => "hash_mismatch",
            FileErrorCode::Protocol => "protocol",
            FileErrorCode::Other(_) => "other",
        }
    }
}

impl std::fmt::Display for FileErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One file-transfer message. `transfer` is chosen by the sender, unique among its transfers
/// to this peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileMsg<'a> {
    /// `[0x01][transfer u64][size u64][sha256 32][name …]`: all-zero `sha256` means the sender
    /// does not know the whole file's hash yet (a stream): such a transfer cannot resume.
    Offer {
        /// Transfer id.
        transfer: u64,
        /// File size in bytes.
        size: u64,
        /// SHA-256 of the whole file, or zeros.
        sha256: Hash,
        /// The sender's name for the file (UTF-8, at most `MAX_TEXT` bytes; the receiver
        /// sanitises it).
        name: &'a str,
    },
    /// `[0x02][transfer u64][offset u64]`.
    Accept {
        /// Transfer id.
        transfer: u64,
        /// First byte to send: what the receiver already has, checked (0: everything).
        offset: u64,
    },
    /// `[0x03][transfer u64][code u8][reason …]`.
    Reject {
        /// Transfer id.
        transfer: u64,
        /// Why.
        code: FileErrorCode,
        /// For people (UTF-8, at most `MAX_TEXT` bytes).
        reason: &'a str,
    },
    /// `[0x04][transfer u64][offset u64][sha256 32][bytes …]`.
    Chunk {
        /// Transfer id.
        transfer: u64,
        /// Where `bytes` go in the file.
        offset: u64,
        /// SHA-256 of `bytes`.
        sha256: Hash,
        /// At most `MAX_CHUNK` bytes.
        bytes: &'a [u8],
    },
    /// `[0x05][transfer u64][offset u64]`.
    Verified {
        /// Transfer id.
        transfer: u64,
        /// Everything below it is written and checked.
        offset: u64,
    },
    /// `[0x06][transfer u64][sha256 32]`.
    End {
        /// Transfer id.
        transfer: u64,
        /// SHA-256 of the whole file.
        sha256: Hash,
    },
    /// `[0x07][transfer u64]`.
    Done {
        /// Transfer id.
        transfer: u64,
    },
    /// `[0x08][transfer u64][code u8][reason …]`.
    Cancel {
        /// Transfer id.
        transfer: u64,
        /// Why.
        code: FileErrorCode,
        /// For people (UTF-8, at most `MAX_TEXT` bytes).
        reason: &'a str,
    },
}

/// Why a file-transfer message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileMsgError {
    /// Shorter than its fixed part.
    #[error("file message truncated: kind 0x{kind:02x}, {len} bytes")]
    Truncated {
        /// Its kind byte.
        kind: u8,
        /// Its length.
        len: usize,
    },
    /// Longer than its kind allows.
    #[error("file message too long: kind 0x{kind:02x}, {len} bytes")]
    TooLong {
        /// Its kind byte.
        kind: u8,
        /// Its length.
        len: usize,
    },
    /// The kind byte is not known.
    #[error("unknown file message kind 0x{0:02x}")]
    UnknownKind(u8),
    /// A name or reason is not UTF-8.
    #[error("file message text is not UTF-8")]
    NotUtf8,
    /// An empty message.
    #[error("empty file message")]
    Empty,
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

fn hash_at(buf: &[u8], at: usize) -> Hash {
    let mut h = [0; HASH_LEN];
    h.copy_from_slice(&buf[at..at + HASH_LEN]);
    h
}

impl<'a> FileMsg<'a> {
    /// The transfer id.
    pub fn transfer(&self) -> u64 {
        match *self {
            FileMsg::Offer { transfer, .. }
            | FileMsg::Accept { transfer, .. }
            | FileMsg::Reject { transfer, .. }
            | FileMsg::Chunk { transfer, .. }
            | FileMsg::Verified { transfer, .. }
            | FileMsg::End { transfer, .. }
            | FileMsg::Done { transfer }
            | FileMsg::Cancel { transfer, .. } => transfer,
        }
    }

    /// Encode into a fresh buffer. Texts longer than `MAX_TEXT` are cut at a character
    /// boundary; a chunk longer than `MAX_CHUNK` is the caller's bug (the decoder refuses it).
    pub fn encode(&self) -> Vec<u8> {
        let text = |s: &str| -> Vec<u8> {
            let mut end = s.len().min(MAX_TEXT);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.as_bytes()[..end].to_vec()
        };
        let mut out = Vec::new();
        match self {
            FileMsg::Offer {
                transfer,
                size,
                sha256,
                name,
            } => {
                out.push(kind::OFFER);
                out.extend_from_slice(&transfer.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(sha256);
                out.extend_from_slice(&text(name));
            }
            FileMsg::Accept { transfer, offset } | FileMsg::Verified { transfer, offset } => {
                out.push(if matches!(self, FileMsg::Accept { .. }) {
                    kind::ACCEPT
                } else {
                    kind::VERIFIED
                });
                out.extend_from_slice(&transfer.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
            }
            FileMsg::Reject {
                transfer,
                code,
                reason,
            }
            | FileMsg::Cancel {
                transfer,
                code,
                reason,
            } => {
                out.push(if matches!(self, FileMsg::Reject { .. }) {
                    kind::REJECT
                } else {
                    kind::CANCEL
                });
                out.extend_from_slice(&transfer.to_be_bytes());
                out.push(code.to_u8());
                out.extend_from_slice(&text(reason));
            }
            FileMsg::Chunk {
                transfer,
                offset,
                sha256,
                bytes,
            } => {
                out.reserve(49 + bytes.len());
                out.push(kind::CHUNK);
                out.extend_from_slice(&transfer.to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(sha256);
                out.extend_from_slice(bytes);
            }
            FileMsg::End { transfer, sha256 } => {
                out.push(kind::END);
                out.extend_from_slice(&transfer.to_be_bytes());
                out.extend_from_slice(sha256);
            }
            FileMsg::Done { transfer } => {
                out.push(kind::DONE);
                out.extend_from_slice(&transfer.to_be_bytes());
            }
        }
        out
    }

    /// Decode one file-transfer message.
    pub fn decode(buf: &'a [u8]) -> Result<Self, FileMsgError> {
        let &k = buf.first().ok_or(FileMsgError::Empty)?;
        let len = buf.len();
        // Fixed length, and most bytes after it.
        let (fixed, rest_max) = match k {
            kind::OFFER => (49, MAX_TEXT),
            kind::ACCEPT | kind::VERIFIED => (17, 0),
            kind::REJECT | kind::CANCEL => (10, MAX_TEXT),
            // 1 to MAX_CHUNK bytes of the file.
            kind::CHUNK => (50, MAX_CHUNK - 1),
            kind::END => (41, 0),
            kind::DONE => (9, 0),
            other => return Err(FileMsgError::UnknownKind(other)),
        };
        if len < fixed {
            return Err(FileMsgError::Truncated { kind: k, len });
        }
        if len - fixed > rest_max {
            return Err(FileMsgError::TooLong { kind: k, len });
        }
        let transfer = u64_at(buf, 1);
        let text = |at: usize| std::str::from_utf8(&buf[at..]).map_err(|_| FileMsgError::NotUtf8);
        Ok(match k {
            kind::OFFER => FileMsg::Offer {
                transfer,
                size: u64_at(buf, 9),
                sha256: hash_at(buf, 17),
                name: text(49)?,
            },
            kind::ACCEPT => FileMsg::Accept {
                transfer,
                offset: u64_at(buf, 9),
            },
            kind::VERIFIED => FileMsg::Verified {
                transfer,
                offset: u64_at(buf, 9),
            },
            kind::REJECT => FileMsg::Reject {
                transfer,
                code: FileErrorCode::from_u8(buf[9]),
                reason: text(10)?,
            },
            kind::CANCEL => FileMsg::Cancel {
                transfer,
                code: FileErrorCode::from_u8(buf[9]),
                reason: text(10)?,
            },
            kind::CHUNK => FileMsg::Chunk {
                transfer,
                offset: u64_at(buf, 9),
                sha256: hash_at(buf, 17),
                bytes: &buf[49..],
            },
            kind::END => FileMsg::End {
                transfer,
                sha256: hash_at(buf, 9),
            },
            _ => FileMsg::Done { transfer },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn every_message_round_trips_with_its_documented_bytes() {
        let h = [0xab; HASH_LEN];
        let cases: Vec<(FileMsg, String)> = vec![
            (
                FileMsg::Offer {
                    transfer: 7,
                    size: 3,
                    sha256: h,
                    name: "a.txt",
                },
                format!("01{:016x}{:016x}{}612e747874", 7, 3, hex(&h)),
            ),
            (
                FileMsg::Accept {
                    transfer: 7,
                    offset: 262144,
                },
                format!("02{:016x}{:016x}", 7, 262144),
            ),
            (
                FileMsg::Reject {
                    transfer: 7,
                    code: FileErrorCode::Rejected,
                    reason: "no",
                },
                format!("03{:016x}016e6f", 7),
            ),
            (
                FileMsg::Chunk {
                    transfer: 7,
                    offset: 0,
                    sha256: h,
                    bytes: b"xyz",
                },
                format!("04{:016x}{:016x}{}78797a", 7, 0, hex(&h)),
            ),
            (
                FileMsg::Verified {
                    transfer: 7,
                    offset: 3,
                },
                format!("05{:016x}{:016x}", 7, 3),
            ),
            (
                FileMsg::End {
                    transfer: 7,
                    sha256: h,
                },
                format!("06{:016x}{}", 7, hex(&h)),
            ),
            (FileMsg::Done { transfer: 7 }, format!("07{:016x}", 7)),
            (
                FileMsg::Cancel {
                    transfer: 7,
                    code: FileErrorCode::DiskFull,
                    reason: "",
                },
                format!("08{:016x}04", 7),
            ),
        ];
        for (msg, bytes) in cases {
            let enc = msg.encode();
            assert_eq!(hex(&enc), bytes, "{msg:?}");
            assert_eq!(FileMsg::decode(&enc).unwrap(), msg);
        }
    }

    #[test]
    fn bad_messages_get_typed_errors() {
        assert_eq!(FileMsg::decode(&[]), Err(FileMsgError::Empty));
        assert_eq!(
            FileMsg::decode(&[0x09; 20]),
            Err(FileMsgError::UnknownKind(0x09))
        );
        assert_eq!(
            FileMsg::decode(&[kind::ACCEPT; 16]),
            Err(FileMsgError::Truncated {
                kind: kind::ACCEPT,
                len: 16
            })
        );
        assert_eq!(
            FileMsg::decode(&[kind::DONE; 10]),
            Err(FileMsgError::TooLong {
                kind: kind::DONE,
                len: 10
            })
        );
        let mut big = vec![kind::CHUNK; 49 + MAX_CHUNK + 1];
        big[0] = kind::CHUNK;
        assert!(matches!(
            FileMsg::decode(&big),
            Err(FileMsgError::TooLong { .. })
        ));
        let mut bad_name = FileMsg::Offer {
            transfer: 1,
            size: 1,
            sha256: [0; HASH_LEN],
            name: "x",
        }
        .encode();
        *bad_name.last_mut().unwrap() = 0xff;
        assert_eq!(FileMsg::decode(&bad_name), Err(FileMsgError::NotUtf8));
        // Long texts are cut at a character boundary, never inside one.
        let long = "é".repeat(MAX_TEXT);
        let enc = FileMsg::Cancel {
            transfer: 1,
            code: FileErrorCode::Io,
            reason: &long,
        }
        .encode();
        match FileMsg::decode(&enc).unwrap() {
            FileMsg::Cancel { reason, .. } => assert_eq!(reason.len(), MAX_TEXT),
            other => panic!("{other:?}"),
        }
        for b in 0..=u8::MAX {
            assert_eq!(FileErrorCode::from_u8(b).to_u8(), b);
        }
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and what decodes encodes to the same bytes.
        #[test]
        fn arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(msg) = FileMsg::decode(&buf) {
                prop_assert_eq!(msg.encode(), buf);
            }
        }
    }
}
