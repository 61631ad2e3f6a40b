//! File names from peers: what a receiver may create in its download directory.

use std::path::{Path, PathBuf};

use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

/// Longest name a receiver creates (bytes of UTF-8; file systems allow 255).
pub const MAX_NAME: usize = 200;

/// The name a receiver uses for a file a peer offered as `offered`: only its last path
/// component (`../../etc/passwd` is `passwd`, `C:\x\y.txt` is `y.txt`), without characters no
/// file system takes (`/ \ ? < > : * | "`), control and Unicode format characters (bidi
/// overrides, zero-width), trailing dots and spaces, a leading dot (no hidden files), and
/// Windows device names (`CON`, `nul.txt`, `COM1` …, anywhere, for portable names), at most
/// `MAX_NAME` bytes. Never empty: a name with nothing left is `file`.
pub fn safe_file_name(offered: &str) -> String {
    let last = offered.rsplit(['/', '\\']).next().unwrap_or_default();
    let visible: String = last
        .chars()
        .map(|c| {
            if c.is_control() || c.general_category() == GeneralCategory::Format {
                '_'
            } else {
                c
            }
        })
        .collect();
    // Cut first, keeping a short extension, so that the sanitiser's own cut never drops it.
    let mut name = visible;
    if name.len() > MAX_NAME {
        let ext = Path::new(&name)
            .extension()
            .and_then(|e| e.to_str())
            .filter(|e| e.len() <= 16)
            .map(|e| format!(".{e}"))
            .unwrap_or_default();
        let mut end = MAX_NAME - ext.len();
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name = format!("{}{ext}", &name[..end]);
    }
    let options = sanitize_filename::Options {
        windows: true,
        truncate: false,
        replacement: "_",
    };
    let mut name = sanitize_filename::sanitize_with_options(name, options);
    // No hidden files, and nothing that looks like a receiver's own partial files.
    while name.starts_with('.') {
        name.replace_range(..1, "_");
    }
    let trimmed = name.trim_end_matches(['.', ' ']);
    if trimmed.chars().all(|c| c == '_' || c == ' ') {
        return "file".into();
    }
    trimmed.to_string()
}

/// A path in `dir` for `name` that does not exist yet: `name`, else `stem (1).ext`,
/// `stem (2).ext` … (an existing file is never overwritten). `None` after 9999 tries.
pub fn unused_path(dir: &Path, name: &str) -> Option<PathBuf> {
    let first = dir.join(name);
    if !exists(&first) {
        return Some(first);
    }
    let p = Path::new(name);
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or(name);
    let ext = p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| format!(".{e}"))
        .unwrap_or_default();
    (1..10_000)
        .map(|n| dir.join(format!("{stem} ({n}){ext}")))
        .find(|p| !exists(p))
}

fn exists(p: &Path) -> bool {
    // A dangling symlink exists too: never write through one.
    p.symlink_metadata().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_become_plain_file_names() {
        let cases = [
            ("report.pdf", "report.pdf"),
            ("../../etc/passwd", "passwd"),
            ("/etc/shadow", "shadow"),
            ("C:\\Windows\\system32\\cmd.exe", "cmd.exe"),
            ("..", "file"),
            ("...", "file"),
            ("", "file"),
            ("dir/", "file"),
            (".bashrc", "_bashrc"),
            ("CON", "file"),
            ("nul.txt", "file"),
            ("com1", "file"),
            ("a<b>c:d\"e|f?g*h", "a_b_c_d_e_f_g_h"),
            ("evil\u{202e}txt.exe", "evil_txt.exe"),
            ("zero\u{200b}width", "zero_width"),
            ("tab\there\n", "tab_here_"),
            ("trailing. . ", "trailing_"),
            ("héllo wörld.txt", "héllo wörld.txt"),
        ];
        for (offered, want) in cases {
            assert_eq!(safe_file_name(offered), want, "{offered:?}");
        }
        let long = format!("{}.tar.gz", "ä".repeat(300));
        let name = safe_file_name(&long);
        assert!(name.len() <= MAX_NAME, "{}", name.len());
        assert!(name.ends_with(".gz"), "{name}");
    }

    #[test]
    fn existing_files_are_never_chosen() {
        let dir = std::env::temp_dir().join(format!("peermesh-names-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(unused_path(&dir, "a.txt").unwrap(), dir.join("a.txt"));
        std::fs::write(dir.join("a.txt"), b"1").unwrap();
        std::fs::write(dir.join("a (1).txt"), b"2").unwrap();
        assert_eq!(unused_path(&dir, "a.txt").unwrap(), dir.join("a (2).txt"));
        std::fs::write(dir.join("noext"), b"3").unwrap();
        assert_eq!(unused_path(&dir, "noext").unwrap(), dir.join("noext (1)"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.join("nowhere"), dir.join("link")).unwrap();
            assert_eq!(unused_path(&dir, "link").unwrap(), dir.join("link (1)"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
