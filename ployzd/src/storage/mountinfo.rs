//! Whether a path is a mount point, from `/proc/self/mountinfo`: the pool
//! teardown and the ZFS backend check that a volume's path really is its
//! filesystem before handing it out (writes to an unmounted mount point land
//! on the parent filesystem, silently).

use std::path::Path;

/// Whether `path` is a mount point in this process's mount namespace.
/// An unreadable mount table counts as mounted, the cautious answer for both
/// callers.
pub(crate) fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let path = path.to_string_lossy();
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| unescape(mount_point) == path)
}

/// Undoes mountinfo's octal escapes (`\040` for a space and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes.get(index + 1..index + 4);
        match escape {
            Some(digits)
                if bytes[index] == b'\\'
                    && digits.iter().all(|digit| (b'0'..=b'7').contains(digit)) =>
            {
                let value = digits
                    .iter()
                    .fold(0_u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                index += 4;
            }
            Some(_) | None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_fresh_folder_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().expect("temporary directory");
        assert!(!is_mount_point(dir.path()));
    }
}
