//! Acknowledged forwards between hubs (pure): a hub that sends a connection
//! to another hub asks, in its PROXY v2 header, to be told whether that hub
//! serves it; the receiving hub answers with [`ANSWER_LEN`] bytes before any
//! byte of its answer to the client. Only on an acceptance does the sender
//! splice; on a refusal, a close or no answer in time it marks the hub as one
//! that did not answer and tries the next hub that serves the host, with the
//! same first bytes. So a stale table (the other hub no longer has the
//! route), a paused route or one at capacity costs the client nothing while
//! another hub can serve it.
//!
//! The request is a TLV of type [`TLV_TYPE`] (in the PROXY v2 range for
//! custom use), value one byte: the acknowledgement version ([`VERSION`]).
//! With a mesh secret it comes before the seal, whose MAC covers it
//! ([`super::seal`]): it cannot be added to or taken from a sealed header.
//! A hub asks only a hub whose record says it answers ([`VERSION`] in the
//! record's `ack`): hubs of older releases neither say so nor answer, and
//! their connections count as taken once the header is written, as before.
//!
//! The answer, always [`ANSWER_LEN`] bytes:
//!
//! | bytes | field |
//! |---|---|
//! | 2 | `GW` |
//! | 1 | version 1 |
//! | 1 | 0: served here; else why not ([`Refusal`]) |
//!
//! A refusal is about this hub, not the client: a client the route denies
//! or rate-limits is taken, and gets the route's answer as it would from any
//! hub. No I/O.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use crate::proxy::proxy_protocol::{tlvs_v2, SIGNATURE};
use crate::proxy::stats::ErrorKind;

/// The TLV type of an acknowledgement request.
pub const TLV_TYPE: u8 = 0xE8;
/// The acknowledgement version this code asks for and answers.
pub const VERSION: u8 = 1;
/// The whole request TLV.
pub const REQUEST: [u8; 4] = [TLV_TYPE, 0, 1, VERSION];
/// The length of an answer.
pub const ANSWER_LEN: usize = 4;
const MAGIC: [u8; 2] = *b"GW";

/// Why a hub does not serve a connection another hub sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It has no route for the host (the sender's table is stale).
    NoRoute,
    /// Its route terminates TLS but it holds no certificate for the host.
    NoCertificate,
    /// The route is paused on this hub.
    Paused,
    /// The route's backends take no more connections (passthrough).
    Full,
    /// A reason of a newer release.
    Other(u8),
}

impl Refusal {
    fn code(self) -> u8 {
        match self {
            Refusal::NoRoute => 1,
            Refusal::NoCertificate => 2,
            Refusal::Paused => 3,
            Refusal::Full => 4,
            // (Never one of the codes above, nor an acceptance.)
            Refusal::Other(c) if c > 4 => c,
            Refusal::Other(_) => u8::MAX,
        }
    }

    fn from_code(c: u8) -> Refusal {
        match c {
            1 => Refusal::NoRoute,
            2 => Refusal::NoCertificate,
            3 => Refusal::Paused,
            4 => Refusal::Full,
            c => Refusal::Other(c),
        }
    }

    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no route for the host",
            Refusal::NoCertificate => "no certificate for the host",
            Refusal::Paused => "the route is paused",
            Refusal::Full => "the route takes no more connections",
            Refusal::Other(_) => "a reason of a newer release",
        }
    }
}

/// A receiving hub's decision: `Ok`, it serves the connection.
pub type Verdict = Result<(), Refusal>;

/// The answer for `v`.
pub fn encode(v: Verdict) -> [u8; ANSWER_LEN] {
    let [g, w] = MAGIC;
    [g, w, VERSION, v.err().map_or(0, Refusal::code)]
}

/// Why some bytes are not an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not an acknowledgement (the other hub runs another release, or is not a hub)")]
pub struct NotAnAnswer;

/// The verdict `answer` carries.
pub fn decode(answer: [u8; ANSWER_LEN]) -> Result<Verdict, NotAnAnswer> {
    match answer {
        [g, w, VERSION, 0] if [g, w] == MAGIC => Ok(Ok(())),
        [g, w, VERSION, c] if [g, w] == MAGIC => Ok(Err(Refusal::from_code(c))),
        _ => Err(NotAnAnswer),
    }
}

/// Why a request could not be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("acknowledgement request of another version or length ({0:02x?})")]
    Unsupported(Vec<u8>),
    #[error("acknowledgement requested twice")]
    Twice,
    #[error("malformed PROXY v2 TLVs: {0}")]
    Tlvs(crate::proxy::proxy_protocol::DecodeError),
}

/// Whether `header` (one whole PROXY header, as read) asks for an answer.
/// A version 1 header carries no TLVs and asks nothing.
pub fn requested(header: &[u8]) -> Result<bool, RequestError> {
    if !header.starts_with(&SIGNATURE) {
        return Ok(false);
    }
    let mut asked = false;
    for t in tlvs_v2(header).map_err(RequestError::Tlvs)? {
        if t.kind != TLV_TYPE {
            continue;
        }
        if t.value != [VERSION] {
            return Err(RequestError::Unsupported(t.value.to_vec()));
        }
        if asked {
            return Err(RequestError::Twice);
        }
        asked = true;
    }
    Ok(asked)
}

/// What a receiving hub knows of its route for the connection's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteState {
    /// It can answer over the connection's protocol: plain HTTP, TLS
    /// passed through, or TLS terminated with a certificate held.
    pub servable: bool,
    pub paused: bool,
}

/// Whether a receiving hub serves a connection for a host whose route here
/// is `route` (`None`: it has none). Capacity, where it is known before the
/// answer (passthrough), is the caller's ([`Refusal::Full`]).
pub fn verdict(route: Option<RouteState>) -> Verdict {
    match route {
        None => Err(Refusal::NoRoute),
        Some(r) if !r.servable => Err(Refusal::NoCertificate),
        Some(r) if r.paused => Err(Refusal::Paused),
        Some(_) => Ok(()),
    }
}

/// What came back from a hub asked for an answer, as the sender read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// [`ANSWER_LEN`] bytes.
    Bytes([u8; ANSWER_LEN]),
    /// Closed (or reset) before that many.
    Closed,
    /// Nothing in the hub's time.
    TimedOut,
}

/// Why the sender leaves a hub it asked for an answer for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Refused(Refusal),
    Closed,
    TimedOut,
    NotAnAnswer,
}

impl Failure {
    /// The error counted when no hub takes the connection after this.
    pub fn kind(self) -> ErrorKind {
        match self {
            Failure::Refused(_) | Failure::Closed => ErrorKind::BackendRefused,
            Failure::TimedOut => ErrorKind::BackendTimeout,
            Failure::NotAnAnswer => ErrorKind::BackendProtocol,
        }
    }

    /// The hub said no (rather than said nothing, or nothing readable).
    pub fn is_refusal(self) -> bool {
        matches!(self, Failure::Refused(_))
    }

    /// For logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Refused(r) => r.as_str(),
            Failure::Closed => "closed without an answer",
            Failure::TimedOut => "no answer in time",
            Failure::NotAnAnswer => "answered something else",
        }
    }
}

/// Whether the sender splices (`Ok`) or tries the next hub.
pub fn outcome(reply: Reply) -> Result<(), Failure> {
    match reply {
        Reply::Bytes(b) => match decode(b) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(r)) => Err(Failure::Refused(r)),
            Err(NotAnAnswer) => Err(Failure::NotAnAnswer),
        },
        Reply::Closed => Err(Failure::Closed),
        Reply::TimedOut => Err(Failure::TimedOut),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::proxy::proxy_protocol::{encode_v2, push_tlv, DecodeError, Transport};
    use proptest::prelude::*;

    fn header(tlvs: &[(u8, &[u8])]) -> Vec<u8> {
        let mut h = Vec::new();
        encode_v2(
            &mut h,
            Transport::Tcp,
            "198.51.100.7:40000".parse().unwrap(),
            "203.0.113.1:443".parse().unwrap(),
        );
        for (k, v) in tlvs {
            push_tlv(&mut h, *k, v);
        }
        h
    }

    #[test]
    fn the_wire_format_is_pinned() {
        assert_eq!(encode(Ok(())), *b"GW\x01\x00");
        assert_eq!(encode(Err(Refusal::NoRoute)), *b"GW\x01\x01");
        assert_eq!(encode(Err(Refusal::NoCertificate)), *b"GW\x01\x02");
        assert_eq!(encode(Err(Refusal::Paused)), *b"GW\x01\x03");
        assert_eq!(encode(Err(Refusal::Full)), *b"GW\x01\x04");
        let h = header(&[(TLV_TYPE, &[VERSION])]);
        assert_eq!(h[h.len() - 4..], REQUEST);
        assert_eq!(&h[14..16], &[0, 12 + 4]);
    }

    #[test]
    fn answers_round_trip_and_other_bytes_are_not_answers() {
        for v in [
            Ok(()),
            Err(Refusal::NoRoute),
            Err(Refusal::NoCertificate),
            Err(Refusal::Paused),
            Err(Refusal::Full),
            Err(Refusal::Other(200)),
        ] {
            assert_eq!(decode(encode(v)), Ok(v));
        }
        // A newer hub's reason is still a refusal, never an acceptance.
        assert_eq!(decode(*b"GW\x01\x09"), Ok(Err(Refusal::Other(9))));
        for c in 0..=4 {
            assert_eq!(
                decode(encode(Err(Refusal::Other(c)))),
                Ok(Err(Refusal::Other(255)))
            );
        }
        // What a hub that does not answer sends first: its client's answer.
        for b in [
            *b"HTTP",
            [0x16, 3, 3, 0],
            [0x15, 3, 3, 0],
            *b"GW\x02\x00",
            *b"gw\x01\x00",
        ] {
            assert_eq!(decode(b), Err(NotAnAnswer), "{b:?}");
        }
    }

    #[test]
    fn a_request_is_found_among_the_tlvs() {
        assert_eq!(requested(&header(&[])), Ok(false));
        assert_eq!(requested(&header(&[(TLV_TYPE, &[VERSION])])), Ok(true));
        assert_eq!(
            requested(&header(&[
                (0x04, b"x"),
                (TLV_TYPE, &[VERSION]),
                (0xE7, &[0; 49])
            ])),
            Ok(true)
        );
        assert_eq!(requested(&header(&[(0xE7, &[0; 49])])), Ok(false));
        assert_eq!(
            requested(&header(&[(TLV_TYPE, &[2])])),
            Err(RequestError::Unsupported(vec![2]))
        );
        assert_eq!(
            requested(&header(&[(TLV_TYPE, &[1, 0])])),
            Err(RequestError::Unsupported(vec![1, 0]))
        );
        assert_eq!(
            requested(&header(&[(TLV_TYPE, &[1]), (TLV_TYPE, &[1])])),
            Err(RequestError::Twice)
        );
        let mut broken = header(&[(TLV_TYPE, &[VERSION])]);
        broken[15] -= 1;
        assert_eq!(
            requested(&broken[..broken.len() - 1]),
            Err(RequestError::Tlvs(DecodeError::Tlv))
        );
        // A version 1 header (a balancer's) has no TLVs.
        assert_eq!(
            requested(b"PROXY TCP4 192.0.2.7 203.0.113.1 1 443\r\n"),
            Ok(false)
        );
    }

    #[test]
    fn a_hub_serves_what_it_has_a_servable_open_route_for() {
        let r = |servable, paused| Some(RouteState { servable, paused });
        assert_eq!(verdict(None), Err(Refusal::NoRoute));
        assert_eq!(verdict(r(false, false)), Err(Refusal::NoCertificate));
        assert_eq!(verdict(r(false, true)), Err(Refusal::NoCertificate));
        assert_eq!(verdict(r(true, true)), Err(Refusal::Paused));
        assert_eq!(verdict(r(true, false)), Ok(()));
    }

    #[test]
    fn only_an_acceptance_is_spliced() {
        assert_eq!(outcome(Reply::Bytes(encode(Ok(())))), Ok(()));
        assert_eq!(
            outcome(Reply::Bytes(encode(Err(Refusal::Paused)))),
            Err(Failure::Refused(Refusal::Paused))
        );
        assert_eq!(outcome(Reply::Closed), Err(Failure::Closed));
        assert_eq!(outcome(Reply::TimedOut), Err(Failure::TimedOut));
        assert_eq!(outcome(Reply::Bytes(*b"HTTP")), Err(Failure::NotAnAnswer));
        assert!(Failure::Refused(Refusal::Full).is_refusal());
        assert!(!Failure::Closed.is_refusal());
        assert_eq!(Failure::TimedOut.kind(), ErrorKind::BackendTimeout);
        assert_eq!(Failure::Closed.kind(), ErrorKind::BackendRefused);
        assert_eq!(Failure::NotAnAnswer.kind(), ErrorKind::BackendProtocol);
    }

    proptest! {
        #[test]
        fn never_panics_and_only_gw1_0_accepts(b in any::<[u8; 4]>(), h in proptest::collection::vec(any::<u8>(), 0..80)) {
            if outcome(Reply::Bytes(b)).is_ok() {
                prop_assert_eq!(b, *b"GW\x01\x00");
            }
            let mut s = SIGNATURE.to_vec();
            s.extend_from_slice(&h);
            let _ = requested(&s);
            let _ = requested(&h);
        }
    }
}
