//! What bytes a configuration file may hold before any YAML is read: at most
//! [`MAX_FILE_SIZE`], UTF-8 text, no NUL.
//!
//! YAML itself allows UTF-16 and UTF-32, and editors on some systems save in UTF-16 by default.
//! Such a file read as UTF-8 gives a confusing syntax error (or, without a byte-order mark,
//! "valid" text full of NULs), so each case gets an error that names the encoding found and
//! where, as a byte offset and a line.

use crate::Location;

/// The largest configuration file read: 10 MiB. A config with thousands of functions is a
/// fraction of that; anything larger is a mistake (the wrong file) or an attack on memory.
pub const MAX_FILE_SIZE: u64 = 10 * 1024 * 1024;

/// A problem with the file's bytes, with where it is when that is one place.
#[derive(Debug, PartialEq)]
pub(crate) struct EncodingError {
    pub(crate) location: Option<Location>,
    pub(crate) message: String,
}

pub(crate) fn too_large(size: u64) -> EncodingError {
    EncodingError {
        location: None,
        message: format!(
            "the file is {size} bytes, over the limit of {MAX_FILE_SIZE} bytes (10 MiB) for a configuration file"
        ),
    }
}

pub(crate) fn check_size(text: &str) -> Result<(), EncodingError> {
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(too_large(text.len() as u64));
    }
    Ok(())
}

/// The text of `bytes`, or why it is not a configuration file's text.
pub(crate) fn decode(bytes: &[u8]) -> Result<&str, EncodingError> {
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(too_large(bytes.len() as u64));
    }
    // UTF-32 first: its little-endian mark begins with UTF-16's.
    let marks: [(&[u8], &str); 4] = [
        (&[0xFF, 0xFE, 0x00, 0x00], "UTF-32 (little-endian)"),
        (&[0x00, 0x00, 0xFE, 0xFF], "UTF-32 (big-endian)"),
        (&[0xFF, 0xFE], "UTF-16 (little-endian)"),
        (&[0xFE, 0xFF], "UTF-16 (big-endian)"),
    ];
    for (mark, encoding) in marks {
        if bytes.starts_with(mark) {
            return Err(EncodingError {
                location: Some(Location { line: 1, column: 1 }),
                message: format!(
                    "the file is {encoding}: it starts with that encoding's byte-order mark at byte offset 0 (line 1); save it as UTF-8"
                ),
            });
        }
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            check_nul(text)?;
            Ok(text)
        }
        Err(error) => {
            let offset = error.valid_up_to();
            let location = position(bytes, offset);
            Err(EncodingError {
                location: Some(location),
                message: format!(
                    "the file is not UTF-8: byte 0x{:02X} at byte offset {offset} (line {}) is not valid UTF-8; save it as UTF-8",
                    bytes[offset], location.line
                ),
            })
        }
    }
}

/// YAML text may not hold NUL; a NUL in the first two bytes is the sign of UTF-16 (or UTF-32)
/// saved without a byte-order mark, where every ASCII character has a zero byte beside it.
pub(crate) fn check_nul(text: &str) -> Result<(), EncodingError> {
    let bytes = text.as_bytes();
    let Some(offset) = bytes.iter().position(|&b| b == 0) else {
        return Ok(());
    };
    let location = position(bytes, offset);
    let guess = match bytes {
        [0, 0, ..] => Some("UTF-32 (big-endian)"),
        [_, 0, 0, 0, ..] => Some("UTF-32 (little-endian)"),
        [0, _, ..] => Some("UTF-16 (big-endian)"),
        [_, 0, ..] => Some("UTF-16 (little-endian)"),
        _ => None,
    };
    let message = match guess {
        Some(encoding) => format!(
            "the file looks like {encoding} without a byte-order mark: a NUL byte at byte offset {offset} (line {}); save it as UTF-8",
            location.line
        ),
        None => format!(
            "a NUL byte at byte offset {offset} (line {}): a YAML file cannot hold one",
            location.line
        ),
    };
    Err(EncodingError {
        location: Some(location),
        message,
    })
}

/// Line and column (in characters, as editors count) of the byte at `offset`; the bytes before
/// it are valid UTF-8.
fn position(bytes: &[u8], offset: usize) -> Location {
    let before = &bytes[..offset];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    Location { line, column }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(bytes: &[u8]) -> String {
        decode(bytes).unwrap_err().message
    }

    #[test]
    fn utf8_text_passes_with_or_without_a_byte_order_mark() {
        assert_eq!(decode(b"a: 1\n").unwrap(), "a: 1\n");
        assert!(decode(b"\xEF\xBB\xBFa: 1\n").is_ok());
        assert!(decode("name: caf\u{e9}\n".as_bytes()).is_ok());
    }

    #[test]
    fn an_invalid_byte_is_placed_by_offset_line_and_column() {
        let error = decode(b"a: 1\nb: caf\xE9\n").unwrap_err();
        assert_eq!(error.location, Some(Location { line: 2, column: 7 }));
        assert_eq!(
            error.message,
            "the file is not UTF-8: byte 0xE9 at byte offset 11 (line 2) is not valid UTF-8; save it as UTF-8"
        );
    }

    #[test]
    fn utf16_and_utf32_are_named_with_or_without_a_mark() {
        let utf16le: Vec<u8> = "a: 1\n".encode_utf16().flat_map(u16::to_le_bytes).collect();
        let utf16be: Vec<u8> = "a: 1\n".encode_utf16().flat_map(u16::to_be_bytes).collect();
        let utf32le: Vec<u8> = "a: 1\n"
            .chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect();
        assert!(
            message(&utf16le).starts_with("the file looks like UTF-16 (little-endian) without")
        );
        assert!(message(&utf16be).starts_with("the file looks like UTF-16 (big-endian) without"));
        assert!(
            message(&utf32le).starts_with("the file looks like UTF-32 (little-endian) without")
        );
        let with_mark = [&[0xFF, 0xFE][..], &utf16le].concat();
        assert!(message(&with_mark).starts_with("the file is UTF-16 (little-endian): it starts"));
        let with_mark = [&[0xFE, 0xFF][..], &utf16be].concat();
        assert!(message(&with_mark).starts_with("the file is UTF-16 (big-endian): it starts"));
        assert!(message(b"\xFF\xFE\0\0a\0\0\0").starts_with("the file is UTF-32 (little-endian)"));
    }

    #[test]
    fn a_nul_inside_utf8_text_is_refused() {
        let error = decode(b"a: 1\nb: x\0y\n").unwrap_err();
        assert_eq!(error.location, Some(Location { line: 2, column: 5 }));
        assert_eq!(
            error.message,
            "a NUL byte at byte offset 9 (line 2): a YAML file cannot hold one"
        );
    }

    #[test]
    fn a_file_over_the_cap_is_refused_with_its_size() {
        let big = vec![b'#'; MAX_FILE_SIZE as usize + 1];
        assert_eq!(
            message(&big),
            "the file is 10485761 bytes, over the limit of 10485760 bytes (10 MiB) for a configuration file"
        );
    }
}
