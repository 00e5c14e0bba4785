//! The Gearman protocol, with no I/O.
//!
//! - [`packet`]: binary framing (`\0REQ`/`\0RES`, type, size, NUL-separated arguments) and
//!   [`encode_packet`], the allocation-free encoder the server uses on its hot path.
//! - [`decoder`]: an incremental [`Decoder`] for a stream that mixes binary packets and admin
//!   lines, decided per message by the first byte.
//! - [`message`]: typed [`Request`]s (to a server) and [`Response`]s (from it).
//! - [`admin`]: the text admin protocol's commands and gearmand's error replies.
//! - [`exception`]: the message in a WORK_EXCEPTION payload (Perl's workers freeze it).

pub mod admin;
pub mod decoder;
pub mod exception;
pub mod message;
pub mod packet;

pub use admin::{AdminCommand, AdminError};
pub use decoder::{DecodeError, Decoder, Message, DEFAULT_MAX_PACKET, MAX_ADMIN_LINE};
pub use message::{GrabKind, ParseError, Priority, Request, Response, Schedule};
pub use packet::{encode_packet, split_args, Frame, Magic, PacketType, HEADER_LEN};
