//! Property tests: every message survives encode → decode, however the stream is split.

use bytes::{Bytes, BytesMut};
use gearbox_proto::{Decoder, GrabKind, Message, Priority, Request, Response, Schedule};
use proptest::prelude::*;

/// An argument that is not the last one cannot hold NUL.
fn word() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(1u8..=255, 0..24).prop_map(Bytes::from)
}

fn blob() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::High), Just(Priority::Normal), Just(Priority::Low)]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        word().prop_map(|function| Request::CanDo { function }),
        (word(), any::<u32>()).prop_map(|(function, timeout)| Request::CanDoTimeout { function, timeout }),
        word().prop_map(|function| Request::CantDo { function }),
        Just(Request::ResetAbilities),
        Just(Request::PreSleep),
        (word(), word(), blob(), priority(), any::<bool>()).prop_map(
            |(function, unique, data, priority, background)| {
                Request::SubmitJob { function, unique, data, priority, background }
            }
        ),
        (word(), word(), any::<i64>(), blob())
            .prop_map(|(function, unique, epoch, data)| { Request::SubmitJobEpoch { function, unique, epoch, data } }),
        (word(), word(), [word(), word(), word(), word(), word()], blob()).prop_map(|(function, unique, s, data)| {
            let [minute, hour, day_of_month, month, day_of_week] = s;
            let schedule = Schedule { minute, hour, day_of_month, month, day_of_week };
            Request::SubmitJobSched { function, unique, schedule, data }
        }),
        (word(), word(), word(), blob(), any::<bool>()).prop_map(|(function, unique, reducer, data, background)| {
            Request::SubmitReduceJob { function, unique, reducer, data, background }
        }),
        prop_oneof![Just(GrabKind::Plain), Just(GrabKind::Uniq), Just(GrabKind::All)].prop_map(Request::GrabJob),
        (word(), any::<u32>(), any::<u32>())
            .prop_map(|(handle, numerator, denominator)| { Request::WorkStatus { handle, numerator, denominator } }),
        (word(), blob()).prop_map(|(handle, data)| Request::WorkComplete { handle, data }),
        word().prop_map(|handle| Request::WorkFail { handle }),
        (word(), blob()).prop_map(|(handle, data)| Request::WorkException { handle, data }),
        (word(), blob()).prop_map(|(handle, data)| Request::WorkData { handle, data }),
        (word(), blob()).prop_map(|(handle, data)| Request::WorkWarning { handle, data }),
        word().prop_map(|handle| Request::GetStatus { handle }),
        word().prop_map(|unique| Request::GetStatusUnique { unique }),
        blob().prop_map(|data| Request::EchoReq { data }),
        word().prop_map(|option| Request::OptionReq { option }),
        word().prop_map(|id| Request::SetClientId { id }),
        Just(Request::AllYours),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Noop),
        Just(Response::NoJob),
        word().prop_map(|handle| Response::JobCreated { handle }),
        (word(), word(), blob()).prop_map(|(handle, function, data)| Response::JobAssign { handle, function, data }),
        (word(), word(), word(), blob()).prop_map(|(handle, function, unique, data)| {
            Response::JobAssignUniq { handle, function, unique, data }
        }),
        (word(), word(), word(), word(), blob()).prop_map(|(handle, function, unique, reducer, data)| {
            Response::JobAssignAll { handle, function, unique, reducer, data }
        }),
        (word(), any::<u32>(), any::<u32>())
            .prop_map(|(handle, numerator, denominator)| { Response::WorkStatus { handle, numerator, denominator } }),
        (word(), blob()).prop_map(|(handle, data)| Response::WorkComplete { handle, data }),
        word().prop_map(|handle| Response::WorkFail { handle }),
        (word(), blob()).prop_map(|(handle, data)| Response::WorkException { handle, data }),
        (word(), blob()).prop_map(|(handle, data)| Response::WorkData { handle, data }),
        (word(), blob()).prop_map(|(handle, data)| Response::WorkWarning { handle, data }),
        (word(), any::<bool>(), any::<bool>(), any::<u32>(), any::<u32>()).prop_map(
            |(handle, known, running, numerator, denominator)| {
                Response::StatusRes { handle, known, running, numerator, denominator }
            }
        ),
        (word(), any::<bool>(), any::<bool>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(unique, known, running, numerator, denominator, waiting_clients)| {
                Response::StatusResUnique { unique, known, running, numerator, denominator, waiting_clients }
            }
        ),
        blob().prop_map(|data| Response::EchoRes { data }),
        (word(), blob()).prop_map(|(code, text)| Response::Error { code, text }),
        word().prop_map(|option| Response::OptionRes { option }),
    ]
}

/// Feeds `stream` to a decoder in pieces cut at `cuts` and returns every packet decoded.
fn decode_in_pieces(stream: &[u8], cuts: &[usize]) -> Vec<Message> {
    let decoder = Decoder::default();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed = 0;
    for p in points {
        buf.extend_from_slice(&stream[fed..p]);
        fed = p;
        while let Some(m) = decoder.decode(&mut buf).expect("valid stream") {
            out.push(m);
        }
    }
    assert!(buf.is_empty(), "undecoded bytes left over");
    out
}

proptest! {
    #[test]
    fn requests_roundtrip(reqs in proptest::collection::vec(request(), 1..12),
                          cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
        let mut stream = BytesMut::new();
        for r in &reqs {
            r.encode(&mut stream);
        }
        let decoded: Vec<Request> = decode_in_pieces(&stream, &cuts)
            .into_iter()
            .map(|m| match m {
                Message::Packet(f) => Request::parse(&f).expect("parses"),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        prop_assert_eq!(decoded, reqs);
    }

    #[test]
    fn responses_roundtrip(resps in proptest::collection::vec(response(), 1..12),
                           cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
        let mut stream = BytesMut::new();
        for r in &resps {
            r.encode(&mut stream);
        }
        let decoded: Vec<Response> = decode_in_pieces(&stream, &cuts)
            .into_iter()
            .map(|m| match m {
                Message::Packet(f) => Response::parse(&f).expect("parses"),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        prop_assert_eq!(decoded, resps);
    }

    #[test]
    fn admin_lines_and_packets_interleave(lines in proptest::collection::vec("[a-z ]{1,40}", 1..6),
                                          crlf in any::<bool>(),
                                          cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
        let mut stream = BytesMut::new();
        for l in &lines {
            stream.extend_from_slice(l.as_bytes());
            stream.extend_from_slice(if crlf { b"\r\n" } else { b"\n" });
            Request::EchoReq { data: Bytes::from_static(b"x") }.encode(&mut stream);
        }
        let decoded = decode_in_pieces(&stream, &cuts);
        prop_assert_eq!(decoded.len(), lines.len() * 2);
        for (i, l) in lines.iter().enumerate() {
            prop_assert_eq!(&decoded[2 * i], &Message::AdminLine(Bytes::copy_from_slice(l.as_bytes())));
        }
    }
}

proptest! {
    /// Whatever arrives, decoding and parsing return values or errors, never panic.
    #[test]
    fn arbitrary_bytes_never_panic(stream in proptest::collection::vec(any::<u8>(), 0..400),
                                   type_num in 0u32..50) {
        let decoder = Decoder::new(1 << 16);
        let mut buf = BytesMut::from(&stream[..]);
        while let Ok(Some(m)) = decoder.decode(&mut buf) {
            if let Message::Packet(f) = m {
                let _ = Request::parse(&f);
                let _ = Response::parse(&f);
            }
        }
        // A well-framed packet of any type with an arbitrary body.
        let mut framed = BytesMut::new();
        framed.extend_from_slice(b"\0REQ");
        framed.extend_from_slice(&type_num.to_be_bytes());
        framed.extend_from_slice(&(stream.len() as u32).to_be_bytes());
        framed.extend_from_slice(&stream);
        if let Ok(Some(Message::Packet(f))) = decoder.decode(&mut framed) {
            let _ = Request::parse(&f);
            let _ = gearbox_proto::AdminCommand::parse(&f.body);
        }
    }
}
