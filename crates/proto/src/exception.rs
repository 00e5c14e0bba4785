//! The text of a WORK_EXCEPTION payload.
//!
//! The protocol leaves an exception's payload opaque. Perl's Gearman::Worker sends the `die`
//! message frozen by Storable (`Storable::nfreeze(\$err)`, Gearman/Worker.pm), so the bytes
//! start with Storable's network-order header (`05 0b`) and a string marker. [`text`] finds
//! the message in such a payload; any other payload is returned whole.

/// Storable's first byte for `nfreeze`: major version 2, shifted, with the network-order bit.
const NETORDER_MAJOR_2: u8 = 0x05;
/// Storable 2.x minor versions seen in the wild go up to 11 (`0b`).
const MAX_MINOR: u8 = 0x0b;
/// Storable's string markers: byte strings and UTF-8 strings, with a 1-byte or a 4-byte
/// big-endian length.
const SX_LSCALAR: u8 = 0x01;
const SX_SCALAR: u8 = 0x0a;
const SX_UTF8STR: u8 = 0x17;
const SX_LUTF8STR: u8 = 0x18;

/// The message in an exception payload: the string a Storable-frozen scalar holds, or the
/// payload itself.
pub fn text(payload: &[u8]) -> &[u8] {
    frozen_string(payload).unwrap_or(payload)
}

fn frozen_string(payload: &[u8]) -> Option<&[u8]> {
    let [NETORDER_MAJOR_2, minor, marker, rest @ ..] = payload else { return None };
    if *minor > MAX_MINOR {
        return None;
    }
    let (len, body) = match *marker {
        SX_SCALAR | SX_UTF8STR => (usize::from(*rest.first()?), &rest[1..]),
        SX_LSCALAR | SX_LUTF8STR => {
            let (len, body) = rest.split_first_chunk::<4>()?;
            (u32::from_be_bytes(*len) as usize, body)
        }
        _ => return None,
    };
    // The whole payload is the one string, or it is not a frozen string at all.
    (body.len() == len).then_some(body)
}

#[cfg(test)]
mod tests {
    use super::text;

    #[test]
    fn perl_die_messages_are_unfrozen() {
        // Storable::nfreeze(\$err) for a short, a long and a UTF-8 message (Perl 5.36).
        let short = b"\x05\x0b\x0a\x31resize failed: no such file at worker.pl line 5.\n";
        assert_eq!(text(short), b"resize failed: no such file at worker.pl line 5.\n");
        let mut long = b"\x05\x0b\x01\x00\x00\x01\x2c".to_vec();
        long.extend_from_slice(&[b'x'; 300]);
        assert_eq!(text(&long), &[b'x'; 300][..]);
        let utf8 = b"\x05\x0b\x17\x0bgr\xc3\xb6\xc3\x9fe \xe2\x98\x83";
        assert_eq!(std::str::from_utf8(text(utf8)).unwrap(), "größe ☃");
    }

    #[test]
    fn other_payloads_stay_as_they_are() {
        for payload in [
            &b"plain text"[..],
            b"",
            b"\x05\x0b",
            // A frozen hash (an exception object): not a string.
            b"\x05\x0b\x04\x03\x00\x00\x00\x01\x08\x81\x00\x00\x00\x01a",
            // A length that does not match.
            b"\x05\x0b\x0a\x10short",
            // An unknown Storable version.
            b"\x05\x20\x0a\x01x",
        ] {
            assert_eq!(text(payload), payload);
        }
    }
}
