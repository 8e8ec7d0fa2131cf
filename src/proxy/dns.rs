//! Authoritative DNS answers for the hub's gateway domains. Two uses:
//! * ACME DNS-01 challenges (RFC 8555, section 8.4): operators delegate
//!   `_acme-challenge.<gateway domain>` to the hub with an NS record; the hub
//!   then answers TXT queries for that name with the current challenge values;
//! * the whole gateway zone (`[proxy.dns]`): operators delegate
//!   `<gateway domain>` to their hubs; each hub answers A and AAAA queries for
//!   the names it serves (its own routes, and those of the mesh) with its own
//!   public addresses (then those of the other hubs of its mesh), NXDOMAIN
//!   for every other name, and SOA and NS at the apex. A hub that is down
//!   does not answer, so resolvers ask the zone's other name servers, which
//!   name their own hubs first ([`zone_lookup`]).
//!
//! Pure: [`respond`] takes the bytes of one received DNS message and returns
//! the bytes to send back, or why nothing is sent. The caller (the UDP and TCP
//! listeners) knows the zones and the challenge values and tells them through
//! a [`Lookup`] for the question's name. No sockets, no clock; it is fuzzed.
//!
//! What is answered (RFC 1035, RFC 2308, RFC 6891):
//! * responses are never answered (no reflection loops), nor unparseable bytes;
//! * an opcode other than QUERY gets NOTIMP, and section counts no query has
//!   (not one question, answer records, more than one authority record, more
//!   than a few additional ones) FORMERR, both from the header alone, before
//!   parsing; over UDP only if the questions the header announces read as
//!   questions, else the datagram is dropped as unparseable (bytes of
//!   another protocol, such as memcached's error reply, must get no answer:
//!   a service that answers anything would answer it, and so on without
//!   end); an authority record in anything but an IXFR query (which carries
//!   the client's SOA there, RFC 1995) FORMERR too;
//! * zone transfers (AXFR, IXFR) and a class other than IN or ANY get
//!   REFUSED ([`Refusal::Query`]), an EDNS version above 0 BADVERS;
//! * a name in no zone gets REFUSED ([`Refusal::Outside`]); a name of a zone
//!   that does not exist NXDOMAIN; a name that exists gets the records it has
//!   of the type asked (TXT: the challenge values; A, AAAA: the hub's
//!   addresses; NS and SOA at the apex; ANY: the first of TXT, the addresses,
//!   SOA that it has), and otherwise NODATA, the SOA in the authority section
//!   with the name's record TTL as its TTL and minimum, so resolvers cache
//!   it (browsers ask HTTPS records on every navigation), except for TXT
//!   queries and `_acme-challenge` names (a challenge value may appear at
//!   any time): 0, as for NXDOMAIN (a name may be declared at any time);
//! * a reply too large for the transport is replaced by its header and
//!   question with TC set, so the client retries over TCP.
//!
//! The reply echoes the question as sent, case included (resolvers that
//! randomise the case of the name check it); [`Lookup`] gets it lowercased.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

use hickory_proto::op::{Edns, Message, MessageType, Metadata, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use std::net::IpAddr;

/// The largest UDP reply to a query without EDNS (RFC 1035, section 4.2.1),
/// and the least a query's EDNS payload size is raised to.
pub const UDP_PLAIN_MAX: usize = 512;
/// The EDNS payload size the hub announces, and the most it sends over UDP
/// whatever the query announces (no IP fragmentation on common paths).
pub const UDP_EDNS_MAX: u16 = 1232;
/// The largest reply over TCP (the two-byte length prefix).
pub const TCP_MAX: usize = 65_535;
/// TTL of TXT and SOA records: challenge values change at any time, and a
/// name just declared must not stay negatively cached.
pub const TTL: u32 = 0;
/// The longest character-string in a TXT record; longer values are split.
pub const TXT_STRING_MAX: usize = 255;

/// SOA serial (the zone has no versions worth counting).
const SOA_SERIAL: u32 = 1;
/// SOA refresh, seconds.
const SOA_REFRESH: i32 = 3600;
/// SOA retry, seconds.
const SOA_RETRY: i32 = 600;
/// SOA expire, seconds.
const SOA_EXPIRE: i32 = 86_400;
/// SOA minimum: the negative-caching TTL (RFC 2308), 0 so that a value just
/// published is seen at once. NODATA for a name that exists gives its
/// records' TTL instead (TXT and `_acme-challenge` names excepted).
const SOA_MINIMUM: u32 = 0;

/// What the hub serves for a name (the caller knows its zones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// In no zone this hub serves: REFUSED.
    Outside,
    /// The apex of a zone, with the TXT values to give (possibly none:
    /// NOERROR with no answer): the same as [`Lookup::Name`] with
    /// [`Records::apex`] set and only `txt`.
    Apex {
        /// The zone's name, lowercase, without the trailing dot.
        zone: String,
        /// The TXT values, one record each.
        txt: Vec<String>,
    },
    /// A name that exists in `zone`, with its records (none of the type asked:
    /// NODATA).
    Name {
        /// The zone's name, lowercase, without the trailing dot.
        zone: String,
        /// What the name holds.
        records: Records,
    },
    /// A name below a zone's apex: NXDOMAIN.
    Below {
        /// The zone's name, lowercase, without the trailing dot.
        zone: String,
    },
}

/// Addresses a served name gets at most (this hub's first, then the other
/// hubs'), so a reply stays small.
pub const MAX_NAME_ADDRS: usize = 16;

/// The records of a name that exists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Records {
    /// The name is the zone's apex: it holds the SOA and the NS records.
    pub apex: bool,
    /// TXT values, one record each (TTL [`TTL`]).
    pub txt: Vec<String>,
    /// A and AAAA records.
    pub addrs: Vec<IpAddr>,
    /// NS records (apex only): name servers, lowercase, no trailing dot.
    pub ns: Vec<String>,
    /// TTL of the A, AAAA and NS records, and the negative-caching TTL of the
    /// name's NODATA answers (not for TXT, nor at `_acme-challenge` names).
    pub ttl: u32,
}

/// What a gateway zone (`[proxy.dns]`) holds, apart from which names are
/// served (asked of the caller per query).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ZoneData {
    /// The gateway domains, lowercase, no trailing dot.
    pub domains: Vec<String>,
    /// The hub's public addresses: the A and AAAA records of every served name.
    pub addrs: Vec<IpAddr>,
    /// The zones' name servers (the NS records at every apex), each with its
    /// addresses (the A and AAAA records of a name server inside a zone).
    pub ns: Vec<(String, Vec<IpAddr>)>,
    /// TTL of the A, AAAA and NS records.
    pub ttl: u32,
    /// Names only this hub serves (TLS forwards' names): its own addresses,
    /// not the other hubs'.
    pub local: Vec<String>,
}

/// What the hub holds for `qname` (lowercase, no trailing dot, as
/// [`respond`] gives it) in the zones of `zone`: the most specific domain
/// that holds `qname` decides.
/// `served(name)` says whether a name is served (`None`: no) and, if so,
/// the addresses of the other hubs that serve it too (a mesh): they follow
/// this hub's own, so a client whose first address fails tries the next.
/// `served_below(name)` says whether a name strictly below it is served.
/// * the apex: SOA, NS, and the addresses when served;
/// * `_acme-challenge.<domain>`: TXT, the values `challenge(domain)` gives;
/// * a name server's name: its own addresses (another hub's, for the name
///   servers of the others);
/// * a name served: the addresses (a name route is one label down;
///   a name served by another hub of the mesh, or an fqdn route, may be
///   deeper);
/// * a name above a served name, a name server or a nested gateway domain
///   (`b.gw.test` above a served `a.b.gw.test`, `hubs.gw.test` above
///   `ns2.hubs.gw.test`): exists, with no records (NODATA). An NXDOMAIN
///   there would deny every name below (RFC 8020), and a resolver that
///   minimises query names (RFC 9156) asks it first;
/// * every other name of the zone does not exist (NXDOMAIN);
/// * names in no zone: [`Lookup::Outside`].
pub fn zone_lookup(
    qname: &str,
    zone: &ZoneData,
    served: impl Fn(&str) -> Option<Vec<IpAddr>>,
    served_below: impl Fn(&str) -> bool,
    challenge: impl Fn(&str) -> Vec<String>,
) -> Lookup {
    let within = |d: &&String| {
        qname == d.as_str()
            || qname
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.ends_with('.'))
    };
    let Some(domain) = zone.domains.iter().filter(within).max_by_key(|d| d.len()) else {
        return Lookup::Outside;
    };
    let host = |records: Records| Lookup::Name {
        zone: domain.clone(),
        records,
    };
    // This hub's addresses, then the others'.
    let addrs = |others: Vec<IpAddr>| {
        let mut addrs = zone.addrs.clone();
        for a in others {
            if addrs.len() >= MAX_NAME_ADDRS {
                break;
            }
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        Records {
            addrs,
            ttl: zone.ttl,
            ..Records::default()
        }
    };
    if qname == domain {
        let mut r = match served(qname) {
            Some(others) => addrs(others),
            None => Records {
                ttl: zone.ttl,
                ..Records::default()
            },
        };
        r.apex = true;
        r.ns = zone.ns.iter().map(|(n, _)| n.clone()).collect();
        return host(r);
    }
    // (`within` left a head ending in '.'.)
    let head = qname
        .strip_suffix(domain.as_str())
        .and_then(|h| h.strip_suffix('.'))
        .unwrap_or_default();
    if head == "_acme-challenge" {
        return host(Records {
            txt: challenge(domain),
            ..Records::default()
        });
    }
    if let Some((_, ns_addrs)) = zone.ns.iter().find(|(n, _)| n == qname) {
        return host(Records {
            addrs: ns_addrs.clone(),
            ttl: zone.ttl,
            ..Records::default()
        });
    }
    if let Some(others) = served(qname) {
        return host(addrs(others));
    }
    if zone.local.iter().any(|n| n == qname) {
        return host(addrs(Vec::new()));
    }
    let above = |name: &str| {
        name.strip_suffix(qname)
            .is_some_and(|h| h.len() > 1 && h.ends_with('.'))
    };
    if served_below(qname)
        || zone.local.iter().any(|n| above(n))
        || zone.ns.iter().any(|(n, _)| above(n))
        || zone.domains.iter().any(|d| above(d))
    {
        return host(Records {
            ttl: zone.ttl,
            ..Records::default()
        });
    }
    Lookup::Below {
        zone: domain.clone(),
    }
}

/// Why a message got no reply (counted by the driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The bytes are not a DNS message.
    Malformed,
    /// The message is a response (QR=1): answering it could start a loop
    /// between two servers, or reflect a forged one at a victim.
    NotAQuery,
}

/// Why a query got REFUSED (the driver counts the two apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The question's name is in no zone this hub serves.
    Outside,
    /// What is asked is never answered, whatever the name: a zone transfer
    /// (AXFR, IXFR) or a class other than IN or ANY (`version.bind CH TXT`).
    Query,
}

/// The reply and its response code (for the driver's counters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The message to send back, whole (the TCP driver adds the length prefix).
    pub bytes: Vec<u8>,
    /// Its response code, extended (BADVERS) included.
    pub rcode: ResponseCode,
    /// Why, when the response code is REFUSED.
    pub refused: Option<Refusal>,
}

/// Answers one DNS message.
///
/// `lookup` gets the question's name in lowercase ASCII without the trailing
/// dot (the root is the empty string); a byte of a label other than a letter,
/// digit, `-` or `_` is written `\DDD` (decimal), so no odd label reads as a
/// served name. `udp` selects the size limit of the reply: over UDP 512
/// bytes, or the query's EDNS payload size clamped to 512..=1232; over TCP
/// 65535. A reply over the limit is sent truncated (TC=1, header and question
/// only).
pub fn respond(query: &[u8], udp: bool, lookup: impl Fn(&str) -> Lookup) -> Result<Reply, Dropped> {
    if let Some(reply) = refuse_by_header(query, udp)? {
        return Ok(reply);
    }
    // (The header check answered other opcodes and dropped responses.)
    let msg = Message::from_vec(query).map_err(|_| Dropped::Malformed)?;
    let limit = if udp {
        msg.edns.as_ref().map_or(UDP_PLAIN_MAX, |e| {
            usize::from(e.max_payload()).clamp(UDP_PLAIN_MAX, usize::from(UDP_EDNS_MAX))
        })
    } else {
        TCP_MAX
    };
    let (reply, refused) = answer(&msg, lookup);
    let rcode = reply.metadata.response_code;
    let bytes = encode(&reply, limit).ok_or(Dropped::Malformed)?;
    Ok(Reply {
        bytes,
        rcode,
        refused,
    })
}

/// The reply to a query the hub will not answer in full now (a client over
/// its rate over UDP): header and question with TC set and no records, so a
/// real resolver asks again over TCP, and a forged source gets back no more
/// bytes than were sent (RFC 5452's "slip" of response rate limiting).
/// Other opcodes and odd section counts get their header-only reply as in
/// [`respond`] over UDP, and an authority record outside an IXFR query its
/// FORMERR (header and question, TC clear); what is dropped there is dropped
/// here.
pub fn respond_truncated(query: &[u8]) -> Result<Reply, Dropped> {
    if let Some(reply) = refuse_by_header(query, true)? {
        return Ok(reply);
    }
    let msg = Message::from_vec(query).map_err(|_| Dropped::Malformed)?;
    let mut reply = Message::new(msg.metadata.id, MessageType::Response, msg.metadata.op_code);
    reply.metadata = Metadata::response_from_request(&msg.metadata);
    // An EDNS query gets this hub's OPT record back, as from `respond`
    // (RFC 6891 §7), and BADVERS for a version it does not speak.
    reply.edns = msg.edns.as_ref().map(our_edns);
    if unexpected_authority(&msg) {
        reply.metadata.response_code = ResponseCode::FormErr;
    } else if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
        reply.metadata.response_code = ResponseCode::BADVERS;
    } else {
        reply.metadata.truncation = true;
    }
    for q in msg.queries.iter().take(1) {
        reply.add_query(q.clone());
    }
    let rcode = reply.metadata.response_code;
    let mut bytes = reply.to_vec().map_err(|_| Dropped::Malformed)?;
    if bytes.len() > query.len() {
        // A question written compressed (pointing into the header) comes
        // out longer: the header alone, with no question and no OPT record.
        bytes.truncate(12);
        for count in [4..6, 10..12] {
            if let Some(c) = bytes.get_mut(count) {
                c.copy_from_slice(&[0, 0]);
            }
        }
    }
    Ok(Reply {
        bytes,
        rcode,
        refused: None,
    })
}

/// Additional records a query may carry (its OPT record, a signature).
pub const MAX_ADDITIONAL: u16 = 4;
/// Authority records a query may carry: an IXFR query's SOA (RFC 1995,
/// section 3), so that it is parsed and REFUSED as a zone transfer.
pub const MAX_AUTHORITY: u16 = 1;

/// Whether `msg` carries authority records though it is no IXFR query (the
/// only query that has one): FORMERR.
fn unexpected_authority(msg: &Message) -> bool {
    !msg.authorities.is_empty()
        && !msg
            .queries
            .iter()
            .all(|q| q.query_type() == RecordType::IXFR)
}

/// Answers from the header alone what the parser need not see: another
/// opcode than QUERY (NOTIMP), and section counts no query has (FORMERR:
/// not one question, answer records, more than [`MAX_AUTHORITY`] authority
/// ones or [`MAX_ADDITIONAL`] additional ones), since the parser sizes its
/// tables from those counts. The reply is the header: id, opcode, RD and CD of the
/// query, no records. `None`: parse the message. Over UDP (`udp`) a message
/// whose announced questions do not read as questions is dropped instead
/// ([`questions_parse`]): bytes of another protocol that happen to have QR
/// clear (memcached's `SERVER_ERROR` reply reads as a header with one
/// question and 0x5345 authority records) get no reply, so the hub and a
/// service that answers anything do not answer each other without end.
/// Over TCP the client is connected (no forged source, no loop): a header
/// alone is enough.
fn refuse_by_header(query: &[u8], udp: bool) -> Result<Option<Reply>, Dropped> {
    let Some(&[id0, id1, f0, f1, qd0, qd1, an0, an1, ns0, ns1, ar0, ar1]) = query.get(..12) else {
        return Err(Dropped::Malformed);
    };
    if f0 & 0x80 != 0 {
        return Err(Dropped::NotAQuery);
    }
    let count = |hi: u8, lo: u8| u16::from_be_bytes([hi, lo]);
    let opcode = (f0 >> 3) & 0x0f;
    let rcode = if opcode != 0 {
        ResponseCode::NotImp
    } else if count(qd0, qd1) != 1
        || count(an0, an1) != 0
        || count(ns0, ns1) > MAX_AUTHORITY
        || count(ar0, ar1) > MAX_ADDITIONAL
    {
        ResponseCode::FormErr
    } else {
        return Ok(None);
    };
    if udp && !questions_parse(query, count(qd0, qd1)) {
        return Err(Dropped::Malformed);
    }
    // QR, the opcode and RD; CD; the rcode's low four bits.
    let flags0 = 0x80 | (f0 & 0x79);
    let flags1 = (f1 & 0x10) | (u16::from(rcode) & 0x0f) as u8;
    let mut bytes = vec![id0, id1, flags0, flags1];
    bytes.extend_from_slice(&[0; 8]);
    Ok(Some(Reply {
        bytes,
        rcode,
        refused: None,
    }))
}

/// Whether the `count` questions after the header of `query` read as
/// questions (a name, a type and a class each) within the message. Each
/// takes at least five bytes, so a count the message cannot hold fails
/// within a few of them.
fn questions_parse(query: &[u8], count: u16) -> bool {
    let mut d = BinDecoder::new(query);
    d.read_slice(12).is_ok() && (0..count).all(|_| Query::read(&mut d).is_ok())
}

/// The name as given to [`Lookup`]: lowercase ASCII, no trailing dot, odd
/// bytes escaped as `\DDD`.
fn lookup_name(name: &Name) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        for &b in label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                out.push(char::from(b.to_ascii_lowercase()));
            } else {
                out.push_str(&format!("\\{b:03}"));
            }
        }
    }
    out
}

/// The OPT record of a reply to a query that carried `theirs` (RFC 6891
/// §7: a responder that speaks EDNS answers an EDNS query with one): this
/// hub's payload size, version 0, and the query's DNSSEC OK bit.
fn our_edns(theirs: &Edns) -> Edns {
    let mut ours = Edns::new();
    ours.set_max_payload(UDP_EDNS_MAX)
        .set_version(0)
        .set_dnssec_ok(theirs.flags().dnssec_ok);
    ours
}

/// Builds the reply message (before the size rule), and why it is REFUSED
/// if it is.
fn answer(msg: &Message, lookup: impl Fn(&str) -> Lookup) -> (Message, Option<Refusal>) {
    let mut reply = Message::new(msg.metadata.id, MessageType::Response, msg.metadata.op_code);
    // Id, opcode, RD and CD from the query; AA, TC, RA, AD clear.
    reply.metadata = Metadata::response_from_request(&msg.metadata);
    reply.edns = msg.edns.as_ref().map(our_edns);
    let rcode = |mut reply: Message, rcode| {
        reply.metadata.response_code = rcode;
        let refused = (rcode == ResponseCode::Refused).then_some(Refusal::Query);
        (reply, refused)
    };
    // One question (the header check answered every other count).
    let [q] = msg.queries.as_slice() else {
        return rcode(reply, ResponseCode::FormErr);
    };
    reply.add_query(q.clone());

    if unexpected_authority(msg) {
        return rcode(reply, ResponseCode::FormErr);
    }
    if msg.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return rcode(reply, ResponseCode::BADVERS);
    }
    // Refused whatever the name: a class the hub holds nothing of, and zone
    // transfers (an IXFR query's SOA is in the authority section).
    if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY)
        || matches!(q.query_type(), RecordType::AXFR | RecordType::IXFR)
    {
        return rcode(reply, ResponseCode::Refused);
    }
    let (zone, records) = match lookup(&lookup_name(q.name())) {
        Lookup::Outside => {
            reply.metadata.response_code = ResponseCode::Refused;
            return (reply, Some(Refusal::Outside));
        }
        Lookup::Below { zone } => {
            let Some(soa) = soa_record(&zone) else {
                return rcode(reply, ResponseCode::ServFail);
            };
            reply.metadata.authoritative = true;
            reply.add_authority(soa);
            return rcode(reply, ResponseCode::NXDomain);
        }
        Lookup::Apex { zone, txt } => (
            zone,
            Records {
                apex: true,
                txt,
                ..Records::default()
            },
        ),
        Lookup::Name { zone, records } => (zone, records),
    };
    let Some(soa) = soa_record(&zone) else {
        return rcode(reply, ResponseCode::ServFail);
    };
    reply.metadata.authoritative = true;
    let owner = q.name();
    let v4 = || {
        records.addrs.iter().filter_map(|a| match a {
            IpAddr::V4(a) => Some(record(owner, records.ttl, RData::A(A(*a)))),
            IpAddr::V6(_) => None,
        })
    };
    let v6 = || {
        records.addrs.iter().filter_map(|a| match a {
            IpAddr::V6(a) => Some(record(owner, records.ttl, RData::AAAA(AAAA(*a)))),
            IpAddr::V4(_) => None,
        })
    };
    let ns = || {
        records
            .ns
            .iter()
            .filter(|_| records.apex)
            .filter_map(|n| name_of(n))
            .map(|n| record(owner, records.ttl, RData::NS(NS(n))))
    };
    // The SOA owned by the name as asked (the apex), in its case.
    let own_soa = || {
        let mut soa = soa.clone();
        soa.name = owner.clone();
        soa
    };
    let answers: Vec<Record> = match q.query_type() {
        RecordType::TXT => records.txt.iter().map(|v| txt_record(owner, v)).collect(),
        RecordType::A => v4().collect(),
        RecordType::AAAA => v6().collect(),
        RecordType::NS => ns().collect(),
        RecordType::SOA if records.apex => vec![own_soa()],
        // One non-empty RRset (or the address pair), as RFC 8482 has it.
        RecordType::ANY if !records.txt.is_empty() => {
            records.txt.iter().map(|v| txt_record(owner, v)).collect()
        }
        RecordType::ANY if !records.addrs.is_empty() => v4().chain(v6()).collect(),
        RecordType::ANY if records.apex => vec![own_soa()],
        _ => Vec::new(),
    };
    if answers.is_empty() {
        // NODATA. What a name holds besides TXT values (its addresses, NS
        // and SOA at the apex; never HTTPS, SVCB, MX...) changes with a
        // reload or restart at most: resolvers may cache its absence for the
        // name's TTL (RFC 2308: the lesser of the SOA's TTL and its
        // minimum), instead of asking again for every lookup (browsers ask
        // HTTPS records on every navigation). A TXT value not published
        // yet, or a challenge name's, is seen at once.
        let mut soa = soa;
        if q.query_type() != RecordType::TXT && !challenge_name(owner) {
            soa.ttl = records.ttl;
            if let RData::SOA(s) = &mut soa.data {
                s.minimum = records.ttl;
            }
        }
        reply.add_authority(soa);
    }
    for a in answers {
        reply.add_answer(a);
    }
    (reply, None)
}

/// Whether `name` is an `_acme-challenge` name (its first label, any case).
fn challenge_name(name: &Name) -> bool {
    name.iter()
        .next()
        .is_some_and(|l| l.eq_ignore_ascii_case(b"_acme-challenge"))
}

/// A record of class IN.
fn record(owner: &Name, ttl: u32, data: RData) -> Record {
    let mut record = Record::from_rdata(owner.clone(), ttl, data);
    record.dns_class = DNSClass::IN;
    record
}

/// `name` (lowercase, no trailing dot) as a fully qualified [`Name`].
fn name_of(name: &str) -> Option<Name> {
    let mut n = Name::from_labels(name.split('.').map(str::as_bytes)).ok()?;
    n.set_fqdn(true);
    Some(n)
}

/// One TXT record: the value as one character-string, or several of at most
/// [`TXT_STRING_MAX`] bytes when longer (an empty value is one empty string).
fn txt_record(owner: &Name, value: &str) -> Record {
    let bytes = value.as_bytes();
    let strings: Vec<&[u8]> = if bytes.is_empty() {
        vec![bytes]
    } else {
        bytes.chunks(TXT_STRING_MAX).collect()
    };
    record(owner, TTL, RData::TXT(TXT::from_bytes(strings)))
}

/// The zone's SOA record: mname the zone, rname `hostmaster.<zone>`. `None`
/// when `zone` is not a usable name (a caller's mistake: SERVFAIL).
fn soa_record(zone: &str) -> Option<Record> {
    let zone = zone.strip_suffix('.').unwrap_or(zone);
    if zone.is_empty() {
        return None;
    }
    let apex = name_of(zone)?;
    let rname = Name::from_labels(
        std::iter::once("hostmaster")
            .chain(zone.split('.'))
            .map(str::as_bytes),
    )
    .ok()?;
    let soa = SOA::new(
        apex.clone(),
        rname,
        SOA_SERIAL,
        SOA_REFRESH,
        SOA_RETRY,
        SOA_EXPIRE,
        SOA_MINIMUM,
    );
    Some(record(&apex, TTL, RData::SOA(soa)))
}

/// The reply's bytes within `limit`: whole if it fits, else header, question
/// and OPT with TC=1. `None` only if even that does not fit, which a question
/// read from a message (at most 255 bytes of name) cannot cause.
fn encode(reply: &Message, limit: usize) -> Option<Vec<u8>> {
    if let Ok(bytes) = reply.to_vec() {
        if bytes.len() <= limit {
            return Some(bytes);
        }
    }
    let short = reply.truncate();
    short.to_vec().ok().filter(|b| b.len() <= limit)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use hickory_proto::op::OpCode;
    use proptest::prelude::*;

    const ZONE: &str = "_acme-challenge.gw.test";

    /// `dig TXT _acme-challenge.gw.test` as sent: RD and AD set, EDNS with
    /// a 1232-byte payload and a client cookie.
    #[rustfmt::skip]
    const DIG_TXT: [u8; 64] = [
        0xbe, 0xef,             // id
        0x01, 0x20,             // flags: QR=0, opcode QUERY, RD=1, AD=1
        0x00, 0x01,             // QDCOUNT 1
        0x00, 0x00,             // ANCOUNT 0
        0x00, 0x00,             // NSCOUNT 0
        0x00, 0x01,             // ARCOUNT 1 (the OPT record)
        // QNAME _acme-challenge.gw.test.
        15, b'_', b'a', b'c', b'm', b'e', b'-', b'c', b'h', b'a', b'l', b'l', b'e', b'n', b'g', b'e',
        2, b'g', b'w',
        4, b't', b'e', b's', b't',
        0,                      // root
        0x00, 0x10,             // QTYPE TXT (16)
        0x00, 0x01,             // QCLASS IN
        // OPT pseudo-record
        0,                      // owner: root
        0x00, 0x29,             // TYPE OPT (41)
        0x04, 0xd0,             // CLASS: UDP payload size 1232
        0x00,                   // TTL: extended RCODE 0
        0x00,                   //      EDNS version 0
        0x00, 0x00,             //      flags (DO=0)
        0x00, 0x0c,             // RDLENGTH 12
        0x00, 0x0a,             // option COOKIE (10)
        0x00, 0x08,             // option length 8
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // client cookie
    ];

    fn apex<'a>(txt: &'a [&'a str]) -> impl Fn(&str) -> Lookup + 'a {
        move |name: &str| {
            if name == ZONE {
                Lookup::Apex {
                    zone: ZONE.to_string(),
                    txt: txt.iter().map(|s| s.to_string()).collect(),
                }
            } else if name.ends_with(&format!(".{ZONE}")) {
                Lookup::Below {
                    zone: ZONE.to_string(),
                }
            } else {
                Lookup::Outside
            }
        }
    }

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    fn ask(m: &Message, udp: bool, lookup: impl Fn(&str) -> Lookup) -> (Reply, Message) {
        let reply = respond(&m.to_vec().unwrap(), udp, lookup).unwrap();
        let parsed = Message::from_vec(&reply.bytes).unwrap();
        (reply, parsed)
    }

    fn txt_strings(r: &Record) -> Vec<Vec<u8>> {
        match &r.data {
            RData::TXT(t) => t.txt_data.iter().map(|s| s.to_vec()).collect(),
            other => panic!("not TXT: {other:?}"),
        }
    }

    fn soa_of(r: &Record) -> &SOA {
        match &r.data {
            RData::SOA(s) => s,
            other => panic!("not SOA: {other:?}"),
        }
    }

    #[test]
    fn dig_vector() {
        let reply = respond(&DIG_TXT, true, apex(&["token-1", "token-2"])).unwrap();
        assert_eq!(reply.rcode, ResponseCode::NoError);
        let b = &reply.bytes;
        assert_eq!(&b[0..2], &[0xbe, 0xef], "id");
        // QR=1, opcode 0, AA=1, TC=0, RD=1 | RA=0, Z=0, AD=0, CD=0, rcode 0.
        assert_eq!(&b[2..4], &[0x85, 0x00], "flags");
        assert_eq!(&b[4..6], &[0, 1], "QDCOUNT");
        assert_eq!(&b[6..8], &[0, 2], "ANCOUNT");
        assert_eq!(&b[8..10], &[0, 0], "NSCOUNT");
        assert_eq!(&b[10..12], &[0, 1], "ARCOUNT");
        // The question, byte for byte.
        assert_eq!(&b[12..41], &DIG_TXT[12..41]);

        let m = Message::from_vec(b).unwrap();
        let values: Vec<_> = m.answers.iter().map(txt_strings).collect();
        assert_eq!(
            values,
            vec![vec![b"token-1".to_vec()], vec![b"token-2".to_vec()]]
        );
        for r in &m.answers {
            assert_eq!(r.ttl, 0);
            assert_eq!(r.dns_class, DNSClass::IN);
            assert_eq!(lookup_name(&r.name), ZONE);
        }
        let edns = m.edns.as_ref().unwrap();
        assert_eq!(edns.max_payload(), 1232);
        assert_eq!(edns.version(), 0);
        assert!(edns.options().as_ref().is_empty(), "no option echoed");
    }

    #[test]
    fn apex_txt_none_is_nodata() {
        let (r, m) = ask(&query(ZONE, RecordType::TXT), true, apex(&[]));
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn apex_txt_one_and_two() {
        let (_, m) = ask(&query(ZONE, RecordType::TXT), true, apex(&["a"]));
        assert_eq!(m.answers.len(), 1);
        assert_eq!(txt_strings(&m.answers[0]), vec![b"a".to_vec()]);
        assert!(m.authorities.is_empty());

        let (_, m) = ask(&query(ZONE, RecordType::TXT), false, apex(&["a", "b"]));
        assert_eq!(m.answers.len(), 2);
        assert_eq!(txt_strings(&m.answers[1]), vec![b"b".to_vec()]);
    }

    #[test]
    fn any_gives_txt() {
        let (_, m) = ask(&query(ZONE, RecordType::ANY), true, apex(&["v"]));
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].record_type(), RecordType::TXT);
    }

    #[test]
    fn long_and_empty_values() {
        let long = "x".repeat(300);
        let (_, m) = ask(&query(ZONE, RecordType::TXT), false, apex(&[&long, ""]));
        let first = txt_strings(&m.answers[0]);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0].len(), 255);
        assert_eq!(first[1].len(), 45);
        assert_eq!(txt_strings(&m.answers[1]), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn soa_query() {
        let (r, m) = ask(&query(ZONE, RecordType::SOA), true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(m.answers.len(), 1);
        assert!(m.authorities.is_empty());
        let soa = soa_of(&m.answers[0]);
        assert_eq!(lookup_name(&soa.mname), ZONE);
        assert_eq!(lookup_name(&soa.rname), format!("hostmaster.{ZONE}"));
        assert_eq!(
            (soa.serial, soa.refresh, soa.retry, soa.expire, soa.minimum),
            (1, 3600, 600, 86400, 0)
        );
        assert_eq!(m.answers[0].ttl, 0);
    }

    #[test]
    fn a_query_is_nodata_with_soa() {
        for qtype in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::NS,
            RecordType::MX,
        ] {
            let (r, m) = ask(&query(ZONE, qtype), true, apex(&["v"]));
            assert_eq!(r.rcode, ResponseCode::NoError, "{qtype}");
            assert!(m.metadata.authoritative);
            assert!(m.answers.is_empty());
            assert_eq!(m.authorities.len(), 1);
            assert_eq!(lookup_name(&m.authorities[0].name), ZONE);
            assert_eq!(soa_of(&m.authorities[0]).serial, 1);
        }
    }

    #[test]
    fn a_served_names_missing_address_family_may_be_cached() {
        let v4_only = Lookup::Name {
            zone: ZONE.into(),
            records: Records {
                addrs: vec!["203.0.113.10".parse().unwrap()],
                ttl: 60,
                ..Records::default()
            },
        };
        let name = format!("blog.{ZONE}");
        let (_, m) = ask(&query(&name, RecordType::AAAA), true, |_: &str| {
            v4_only.clone()
        });
        assert!(m.answers.is_empty());
        let soa = &m.authorities[0];
        assert_eq!((soa.ttl, soa_of(soa).minimum), (60, 60));
        // A TXT value not there yet, or a name with no address: not cached.
        let (_, m) = ask(&query(&name, RecordType::TXT), true, |_: &str| {
            v4_only.clone()
        });
        assert_eq!(
            (m.authorities[0].ttl, soa_of(&m.authorities[0]).minimum),
            (0, 0)
        );
        let (_, m) = ask(&query(ZONE, RecordType::A), true, apex(&["v"]));
        assert_eq!(
            (m.authorities[0].ttl, soa_of(&m.authorities[0]).minimum),
            (0, 0)
        );
    }

    #[test]
    fn nodata_of_a_name_that_exists_is_cached_for_its_ttl() {
        let host = |_: &str| Lookup::Name {
            zone: "gw.test".into(),
            records: Records {
                addrs: vec!["203.0.113.10".parse().unwrap()],
                ttl: 60,
                ..Records::default()
            },
        };
        // The HTTPS and SVCB records browsers ask on every navigation, and
        // other types no name here holds.
        for t in [
            RecordType::HTTPS,
            RecordType::SVCB,
            RecordType::MX,
            RecordType::CAA,
        ] {
            let (r, m) = ask(&query("blog.gw.test", t), true, host);
            assert_eq!(r.rcode, ResponseCode::NoError, "{t}");
            assert!(m.answers.is_empty(), "{t}");
            let soa = &m.authorities[0];
            assert_eq!((soa.ttl, soa_of(soa).minimum), (60, 60), "{t}");
        }
        // The apex (not served: no address), and a name above a name
        // server, with no records, too.
        for name in ["gw.test", "hubs.gw.test"] {
            for t in [RecordType::HTTPS, RecordType::A] {
                let (r, m) = ask(&query(name, t), true, zl);
                assert_eq!(r.rcode, ResponseCode::NoError, "{name} {t}");
                assert!(m.answers.is_empty(), "{name} {t}");
                let soa = &m.authorities[0];
                assert_eq!((soa.ttl, soa_of(soa).minimum), (60, 60), "{name} {t}");
            }
        }
        // TXT, and any type at a challenge name (any case): 0, a value may
        // come at any time.
        let (_, m) = ask(&query("blog.gw.test", RecordType::TXT), true, host);
        let soa = &m.authorities[0];
        assert_eq!((soa.ttl, soa_of(soa).minimum), (0, 0));
        let challenge = |_: &str| Lookup::Name {
            zone: "gw.test".into(),
            records: Records {
                ttl: 60,
                ..Records::default()
            },
        };
        for t in [RecordType::HTTPS, RecordType::A, RecordType::TXT] {
            let (_, m) = ask(&query("_ACME-challenge.gw.test", t), true, challenge);
            let soa = &m.authorities[0];
            assert_eq!((soa.ttl, soa_of(soa).minimum), (0, 0), "{t}");
        }
        // A name that does not exist: not cached (it may be declared at any
        // time).
        let (r, m) = ask(&query("nope.gw.test", RecordType::HTTPS), true, zl);
        assert_eq!(r.rcode, ResponseCode::NXDomain);
        let soa = &m.authorities[0];
        assert_eq!((soa.ttl, soa_of(soa).minimum), (0, 0));
    }

    #[test]
    fn zone_transfer_refused() {
        let (r, m) = ask(&query(ZONE, RecordType::AXFR), false, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::Refused);
        assert_eq!(r.refused, Some(Refusal::Query));
        assert!(!m.metadata.authoritative);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
        // Whatever the name: one below the apex too (not NXDOMAIN).
        let (r, _) = ask(
            &query(&format!("x.{ZONE}"), RecordType::AXFR),
            false,
            apex(&["v"]),
        );
        assert_eq!(r.refused, Some(Refusal::Query));
    }

    /// An IXFR query as a secondary sends it: the question, and the SOA it
    /// holds in the authority section (RFC 1995).
    fn ixfr(name: &str) -> Message {
        let mut m = query(name, RecordType::IXFR);
        m.add_authority(soa_record(ZONE).unwrap());
        m
    }

    #[test]
    fn ixfr_with_its_soa_is_refused_not_formerr() {
        let (r, m) = ask(&ixfr(ZONE), false, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::Refused);
        assert_eq!(r.refused, Some(Refusal::Query));
        assert!(m.answers.is_empty() && m.authorities.is_empty());
        assert_eq!(m.queries.len(), 1);
        // Over its rate too, it is parsed: a truncated reply, TC set.
        let t = respond_truncated(&ixfr(ZONE).to_vec().unwrap()).unwrap();
        let m = Message::from_vec(&t.bytes).unwrap();
        assert!(m.metadata.truncation);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    }

    #[test]
    fn authority_records_outside_ixfr_are_formerr() {
        let mut q = query(ZONE, RecordType::TXT);
        q.add_authority(soa_record(ZONE).unwrap());
        let (r, m) = ask(&q, true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::FormErr);
        assert_eq!(r.refused, None);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
        let t = respond_truncated(&q.to_vec().unwrap()).unwrap();
        assert_eq!(t.rcode, ResponseCode::FormErr);
        let m = Message::from_vec(&t.bytes).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // Two authority records: FORMERR from the header.
        let mut two = ixfr(ZONE);
        two.add_authority(soa_record(ZONE).unwrap());
        let r = respond(&two.to_vec().unwrap(), false, apex(&["v"])).unwrap();
        assert_eq!((r.rcode, r.bytes.len()), (ResponseCode::FormErr, 12));
    }

    #[test]
    fn refusals_say_why() {
        let why = |m: &Message| respond(&m.to_vec().unwrap(), true, apex(&["v"])).unwrap();
        let r = why(&query("example.com", RecordType::A));
        assert_eq!(
            (r.rcode, r.refused),
            (ResponseCode::Refused, Some(Refusal::Outside))
        );
        let mut ch = query("version.bind", RecordType::TXT);
        ch.queries[0].set_query_class(DNSClass::CH);
        let r = why(&ch);
        assert_eq!(
            (r.rcode, r.refused),
            (ResponseCode::Refused, Some(Refusal::Query))
        );
        for m in [
            query(ZONE, RecordType::TXT),
            query(&format!("x.{ZONE}"), RecordType::A),
        ] {
            assert_eq!(why(&m).refused, None);
        }
    }

    #[test]
    fn below_is_nxdomain() {
        let name = format!("x.{ZONE}");
        let (r, m) = ask(&query(&name, RecordType::TXT), true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::NXDomain);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.metadata.authoritative);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
        assert_eq!(soa_of(&m.authorities[0]).minimum, 0);
    }

    #[test]
    fn outside_is_refused() {
        let (r, m) = ask(&query("example.com", RecordType::TXT), true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::Refused);
        assert!(!m.metadata.authoritative);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.metadata.id, 0x1234);
        assert!(m.metadata.recursion_desired);
        assert!(!m.metadata.recursion_available);
    }

    #[test]
    fn bad_zone_from_caller_is_servfail() {
        let lookup = |_: &str| Lookup::Apex {
            zone: "a..b".to_string(),
            txt: vec!["v".to_string()],
        };
        let (r, _) = ask(&query(ZONE, RecordType::TXT), true, lookup);
        assert_eq!(r.rcode, ResponseCode::ServFail);
    }

    #[test]
    fn class_rules() {
        let mut m = query(ZONE, RecordType::TXT);
        m.queries[0].set_query_class(DNSClass::CH);
        let (r, _) = ask(&m, true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::Refused);
        m.queries[0].set_query_class(DNSClass::ANY);
        let (r, reply) = ask(&m, true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert_eq!(reply.answers.len(), 1);
    }

    #[test]
    fn response_dropped() {
        let mut m = query(ZONE, RecordType::TXT);
        m.metadata.message_type = MessageType::Response;
        assert_eq!(
            respond(&m.to_vec().unwrap(), true, apex(&["v"])),
            Err(Dropped::NotAQuery)
        );
    }

    #[test]
    fn garbage_dropped() {
        for bytes in [
            &[][..],
            &[0x12][..],
            &[0x12, 0x34, 0x01, 0x00, 0x00][..],
            // Header announcing one question that is not there.
            &[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0][..],
            // A name whose compression pointer points at itself.
            &[
                0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 16, 0, 1,
            ][..],
        ] {
            assert_eq!(
                respond(bytes, true, apex(&["v"])),
                Err(Dropped::Malformed),
                "{bytes:?}"
            );
        }
        let mut truncated = DIG_TXT.to_vec();
        truncated.truncate(50);
        assert_eq!(
            respond(&truncated, true, apex(&["v"])),
            Err(Dropped::Malformed)
        );
    }

    #[test]
    fn section_counts_no_query_has_get_formerr_from_the_header() {
        // One question, then 0xffff answer records announced: FORMERR at
        // once, id and RD kept, nothing echoed.
        let mut q = query(ZONE, RecordType::TXT).to_vec().unwrap();
        for (at, v) in [(6usize, [0xffu8, 0xff]), (8, [0, 2]), (10, [0, 5])] {
            let mut bad = q.clone();
            bad[at..at + 2].copy_from_slice(&v);
            let r = respond(&bad, true, apex(&["v"])).unwrap();
            assert_eq!(r.rcode, ResponseCode::FormErr, "offset {at}");
            assert_eq!(r.bytes.len(), 12);
            assert_eq!(&r.bytes[0..2], &bad[0..2]);
            let m = Message::from_vec(&r.bytes).unwrap();
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert!(m.metadata.recursion_desired);
            assert!(m.queries.is_empty() && m.answers.is_empty());
        }
        // 65535 questions announced, 12 bytes sent: FORMERR over TCP; over
        // UDP the questions are not there, dropped.
        q.truncate(12);
        q[4..6].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(
            respond(&q, false, apex(&["v"])).unwrap().rcode,
            ResponseCode::FormErr
        );
        assert_eq!(respond(&q, true, apex(&["v"])), Err(Dropped::Malformed));
        // No question at all (a header alone): FORMERR over UDP too.
        q[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(
            respond(&q, true, apex(&["v"])).unwrap().rcode,
            ResponseCode::FormErr
        );
        // A response is still dropped, whatever its counts.
        q[2] |= 0x80;
        assert_eq!(respond(&q, true, apex(&["v"])), Err(Dropped::NotAQuery));
        assert_eq!(
            respond(&q[..11], true, apex(&["v"])),
            Err(Dropped::Malformed)
        );
    }

    /// memcached's reply to a datagram it cannot take: its 8-byte UDP frame
    /// header (request id, sequence 0, one datagram, reserved), then text.
    const MEMCACHED_ERROR: &[u8] =
        b"\x12\x34\x00\x00\x00\x01\x00\x00SERVER_ERROR multi-packet request not supported\r\n";

    #[test]
    fn other_protocols_get_no_header_reply_over_udp() {
        // It reads as a header (QR clear, one question, 0x5345 authority
        // records): FORMERR from the header alone would go back, memcached
        // would answer that with the same error, and so on. Its question
        // does not read as one: dropped over UDP.
        assert_eq!(
            respond(MEMCACHED_ERROR, true, apex(&["v"])),
            Err(Dropped::Malformed)
        );
        assert_eq!(respond_truncated(MEMCACHED_ERROR), Err(Dropped::Malformed));
        // The same with another opcode (NOTIMP otherwise).
        let mut op = MEMCACHED_ERROR.to_vec();
        op[2] = 0x28; // UPDATE
        assert_eq!(respond(&op, true, apex(&["v"])), Err(Dropped::Malformed));
        // Over TCP the client is connected: a FORMERR, no loop to fear.
        let r = respond(MEMCACHED_ERROR, false, apex(&["v"])).unwrap();
        assert_eq!((r.rcode, r.bytes.len()), (ResponseCode::FormErr, 12));
        // A real question with odd counts is still answered over UDP, from
        // the header: FORMERR, and NOTIMP for another opcode.
        let mut q = query(ZONE, RecordType::TXT).to_vec().unwrap();
        q[8..10].copy_from_slice(b"SE");
        let r = respond(&q, true, apex(&["v"])).unwrap();
        assert_eq!((r.rcode, r.bytes.len()), (ResponseCode::FormErr, 12));
        assert_eq!(respond_truncated(&q).unwrap().rcode, ResponseCode::FormErr);
        q[2] = 0x28;
        let r = respond(&q, true, apex(&["v"])).unwrap();
        assert_eq!(r.rcode, ResponseCode::NotImp);
        // A question cut short is not one.
        let mut cut = query(ZONE, RecordType::TXT).to_vec().unwrap();
        cut[6..8].copy_from_slice(&[0, 1]);
        cut.truncate(cut.len() - 2);
        assert_eq!(respond(&cut, true, apex(&["v"])), Err(Dropped::Malformed));
        assert_eq!(
            respond(&cut, false, apex(&["v"])).unwrap().rcode,
            ResponseCode::FormErr
        );
    }

    #[test]
    fn any_without_values_gives_the_soa() {
        let (_, m) = ask(&query(ZONE, RecordType::ANY), true, apex(&[]));
        assert_eq!(m.answers.len(), 1);
        assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn two_questions_formerr() {
        let mut m = query(ZONE, RecordType::TXT);
        m.add_query(Query::query(Name::from_ascii(ZONE).unwrap(), RecordType::A));
        let (r, reply) = ask(&m, true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::FormErr);
        assert!(reply.queries.is_empty());
        assert!(reply.answers.is_empty());

        let mut none = Message::new(7, MessageType::Query, OpCode::Query);
        none.metadata.recursion_desired = false;
        let (r, _) = ask(&none, true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::FormErr);
    }

    #[test]
    fn other_opcodes_notimp() {
        for op in [
            OpCode::Notify,
            OpCode::Update,
            OpCode::Status,
            OpCode::Unknown(9),
        ] {
            let mut m = query(ZONE, RecordType::SOA);
            m.metadata.op_code = op;
            let (r, reply) = ask(&m, true, apex(&["v"]));
            assert_eq!(r.rcode, ResponseCode::NotImp, "{op}");
            assert_eq!(reply.metadata.op_code, op);
            assert!(!reply.metadata.authoritative);
            assert!(reply.answers.is_empty());
        }
    }

    #[test]
    fn edns_version_1_badvers() {
        let mut q = DIG_TXT;
        q[47] = 1; // EDNS version
        let reply = respond(&q, true, apex(&["v"])).unwrap();
        assert_eq!(reply.rcode, ResponseCode::BADVERS);
        assert_eq!(reply.bytes[3] & 0x0f, 0, "low bits of 16 in the header");
        let m = Message::from_vec(&reply.bytes).unwrap();
        // 16 reads back as BADSIG, which shares the code.
        assert_eq!(u16::from(m.metadata.response_code), 16);
        let edns = m.edns.unwrap();
        assert_eq!(edns.version(), 0);
        assert_eq!(edns.rcode_high(), 1);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn no_edns_no_opt() {
        let (_, m) = ask(&query(ZONE, RecordType::TXT), true, apex(&["v"]));
        assert!(m.edns.is_none());
    }

    #[test]
    fn dnssec_ok_copied() {
        let mut q = DIG_TXT;
        q[48] = 0x80; // DO
        let reply = respond(&q, true, apex(&["v"])).unwrap();
        let m = Message::from_vec(&reply.bytes).unwrap();
        assert!(m.edns.unwrap().flags().dnssec_ok);
    }

    #[test]
    fn case_lowered_for_lookup_and_kept_in_echo() {
        let asked = "_ACME-Challenge.GW.tEsT";
        let seen = std::cell::RefCell::new(String::new());
        let lookup = |name: &str| {
            *seen.borrow_mut() = name.to_string();
            apex(&["v"])(name)
        };
        let (r, m) = ask(&query(asked, RecordType::TXT), true, lookup);
        assert_eq!(seen.borrow().as_str(), ZONE);
        assert_eq!(r.rcode, ResponseCode::NoError);
        let sent = Name::from_ascii(format!("{asked}.")).unwrap();
        assert!(m.queries[0].name().eq_case(&sent));
        assert!(m.answers[0].name.eq_case(&sent));
        let wire = b"\x0f_ACME-Challenge\x02GW\x04tEsT\x00";
        assert_eq!(&r.bytes[12..12 + wire.len()], wire);
    }

    #[test]
    fn binary_labels_escaped() {
        let name = Name::from_labels([&b"a.b"[..], &[0xff, b' ', b'Z'][..], b"test"]).unwrap();
        assert_eq!(lookup_name(&name), "a\\046b.\\255\\032z.test");
        assert_eq!(lookup_name(&Name::root()), "");
        let mut m = Message::new(1, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(name, RecordType::TXT));
        let (r, reply) = ask(&m, true, apex(&["v"]));
        assert_eq!(r.rcode, ResponseCode::Refused);
        assert_eq!(reply.queries.len(), 1);
    }

    fn twenty_values() -> Vec<String> {
        (0..20).map(|i| format!("{i:02}").repeat(100)).collect()
    }

    #[test]
    fn truncation_udp_then_tcp() {
        let values = twenty_values();
        let lookup = |_: &str| Lookup::Apex {
            zone: ZONE.to_string(),
            txt: values.clone(),
        };
        let q = query(ZONE, RecordType::TXT);
        let (r, m) = ask(&q, true, lookup);
        assert!(r.bytes.len() <= UDP_PLAIN_MAX);
        assert!(m.metadata.truncation);
        assert!(m.metadata.authoritative);
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
        assert_eq!(m.queries.len(), 1);

        let (r, m) = ask(&q, false, lookup);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 20);
        assert!(r.bytes.len() > usize::from(UDP_EDNS_MAX));
        let got: Vec<Vec<u8>> = m.answers.iter().flat_map(txt_strings).collect();
        let want: Vec<Vec<u8>> = values.iter().map(|v| v.as_bytes().to_vec()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn edns_payload_sets_udp_limit() {
        // Four 200-byte values: about 900 bytes, over 512 and under 1232.
        let values: Vec<String> = (0..4).map(|i| format!("{i}").repeat(200)).collect();
        let lookup = |_: &str| Lookup::Apex {
            zone: ZONE.to_string(),
            txt: values.clone(),
        };
        let with_payload = |payload: u16| {
            let mut m = query(ZONE, RecordType::TXT);
            let mut e = Edns::new();
            e.set_max_payload(payload);
            m.set_edns(e);
            m
        };
        let (_, m) = ask(&query(ZONE, RecordType::TXT), true, lookup);
        assert!(m.metadata.truncation, "no EDNS: 512");
        let (r, m) = ask(&with_payload(1232), true, lookup);
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 4);
        assert!(r.bytes.len() > UDP_PLAIN_MAX);
        let (_, m) = ask(&with_payload(100), true, lookup);
        assert!(m.metadata.truncation, "raised to 512");
        assert!(m.edns.is_some(), "OPT kept when truncated");
        let big: Vec<String> = twenty_values();
        let lookup = |_: &str| Lookup::Apex {
            zone: ZONE.to_string(),
            txt: big.clone(),
        };
        let (r, m) = ask(&with_payload(65_000), true, lookup);
        assert!(m.metadata.truncation, "capped at 1232");
        assert!(r.bytes.len() <= usize::from(UDP_EDNS_MAX));
    }

    #[test]
    fn too_large_even_for_tcp_is_truncated() {
        let values: Vec<String> = (0..300).map(|_| "v".repeat(255)).collect();
        let lookup = |_: &str| Lookup::Apex {
            zone: ZONE.to_string(),
            txt: values.clone(),
        };
        let (r, m) = ask(&query(ZONE, RecordType::TXT), false, lookup);
        assert!(m.metadata.truncation);
        assert!(r.bytes.len() <= TCP_MAX);
    }

    #[test]
    fn truncated_reply_is_header_and_question() {
        let r = respond_truncated(&DIG_TXT).unwrap();
        assert_eq!(r.rcode, ResponseCode::NoError);
        let m = Message::from_vec(&r.bytes).unwrap();
        assert_eq!(m.metadata.id, 0xbeef);
        assert!(m.metadata.truncation);
        assert!(!m.metadata.authoritative);
        assert_eq!(m.queries.len(), 1);
        assert!(m.answers.is_empty() && m.authorities.is_empty());
        // The EDNS query gets an OPT record back (RFC 6891 §7), with the
        // query's DNSSEC OK bit; one without EDNS gets none.
        let edns = m.edns.expect("OPT record");
        assert_eq!((edns.max_payload(), edns.version()), (UDP_EDNS_MAX, 0));
        assert!(!edns.flags().dnssec_ok);
        let mut q = DIG_TXT;
        q[48] = 0x80; // DO
        let m = Message::from_vec(&respond_truncated(&q).unwrap().bytes).unwrap();
        assert!(m.edns.unwrap().flags().dnssec_ok);
        let plain = query(ZONE, RecordType::TXT).to_vec().unwrap();
        let m = Message::from_vec(&respond_truncated(&plain).unwrap().bytes).unwrap();
        assert!(m.metadata.truncation && m.edns.is_none());
        // An EDNS version it does not speak: BADVERS, not truncated.
        let mut q = DIG_TXT;
        q[47] = 1;
        let bad = respond_truncated(&q).unwrap();
        assert_eq!(bad.rcode, ResponseCode::BADVERS);
        assert!(bad.bytes.len() <= q.len());
        let m = Message::from_vec(&bad.bytes).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.edns.unwrap().rcode_high(), 1);
        // Never larger than the query: nothing to amplify.
        assert!(r.bytes.len() <= DIG_TXT.len());
        // The same rules as respond for what is dropped.
        let mut resp = DIG_TXT;
        resp[2] |= 0x80;
        assert_eq!(respond_truncated(&resp), Err(Dropped::NotAQuery));
        assert_eq!(respond_truncated(&DIG_TXT[..20]), Err(Dropped::Malformed));
        // A question whose name points back into the header (id 10: a
        // ten-byte label, then the zero of ARCOUNT) would come out longer
        // than the query: the header alone goes back.
        let q = [
            10, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x00, 0, 1, 0, 1,
        ];
        match respond_truncated(&q) {
            Ok(r) => {
                assert!(r.bytes.len() <= q.len(), "{} bytes", r.bytes.len());
                assert_eq!(r.bytes[2] & 0x82, 0x82, "QR and TC");
            }
            Err(e) => assert_eq!(e, Dropped::Malformed),
        }
    }

    fn zone() -> ZoneData {
        ZoneData {
            domains: vec!["gw.test".into(), "eu.gw.test".into()],
            addrs: vec![
                "203.0.113.10".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
            ],
            ns: vec![
                ("ns1.gw.test".into(), vec!["203.0.113.10".parse().unwrap()]),
                ("ns.other.test".into(), Vec::new()),
                (
                    "ns2.hubs.gw.test".into(),
                    vec!["198.51.100.20".parse().unwrap()],
                ),
            ],
            ttl: 60,
            local: vec!["db.gw.test".into()],
        }
    }

    fn served(name: &str) -> Option<Vec<IpAddr>> {
        matches!(name, "blog.gw.test" | "shop.eu.gw.test").then(Vec::new)
    }

    fn zl(name: &str) -> Lookup {
        zone_lookup(
            name,
            &zone(),
            served,
            |_| false,
            |d| vec![format!("token-{d}")],
        )
    }

    #[test]
    fn zone_lookup_names() {
        let z = zone();
        let host = |zone: &str| Lookup::Name {
            zone: zone.into(),
            records: Records {
                addrs: z.addrs.clone(),
                ttl: 60,
                ..Records::default()
            },
        };
        assert_eq!(zl("blog.gw.test"), host("gw.test"));
        // The most specific domain decides.
        assert_eq!(zl("shop.eu.gw.test"), host("eu.gw.test"));
        // A name server inside the zone has its own addresses, even two
        // labels down.
        let ns = |a: &str| Lookup::Name {
            zone: "gw.test".into(),
            records: Records {
                addrs: vec![a.parse().unwrap()],
                ttl: 60,
                ..Records::default()
            },
        };
        assert_eq!(zl("ns1.gw.test"), ns("203.0.113.10"));
        assert_eq!(zl("ns2.hubs.gw.test"), ns("198.51.100.20"));
        // Above a name server or a nested domain: there, with nothing (NODATA).
        let empty = Lookup::Name {
            zone: "gw.test".into(),
            records: Records {
                ttl: 60,
                ..Records::default()
            },
        };
        assert_eq!(zl("hubs.gw.test"), empty);
        let nested = |n: &str| {
            let mut z = zone();
            z.domains.push("a.b.gw.test".into());
            zone_lookup(n, &z, served, |_| false, |_| Vec::new())
        };
        assert_eq!(nested("b.gw.test"), empty);
        // A TLS forward's name: this hub's addresses alone; above it, NODATA.
        let forward = |n: &str| {
            let mut z = zone();
            z.local.push("pg.data.gw.test".into());
            zone_lookup(n, &z, |_| None, |_| false, |_| Vec::new())
        };
        assert_eq!(forward("db.gw.test"), host("gw.test"));
        assert_eq!(forward("pg.data.gw.test"), host("gw.test"));
        assert_eq!(forward("data.gw.test"), empty);
        assert!(matches!(forward("x.data.gw.test"), Lookup::Below { .. }));
        // The other hubs' addresses follow this hub's, each once.
        let meshed = |n: &str| {
            zone_lookup(
                n,
                &zone(),
                |_| {
                    Some(vec![
                        "198.51.100.20".parse().unwrap(),
                        "2001:db8::10".parse().unwrap(),
                    ])
                },
                |_| false,
                |_| Vec::new(),
            )
        };
        match meshed("blog.gw.test") {
            Lookup::Name { records, .. } => assert_eq!(
                records.addrs,
                ["203.0.113.10", "2001:db8::10", "198.51.100.20"]
                    .map(|a| a.parse::<IpAddr>().unwrap())
            ),
            other => panic!("{other:?}"),
        }
        let crowd = zone_lookup(
            "blog.gw.test",
            &zone(),
            |_| Some((0..40u8).map(|i| IpAddr::from([192, 0, 2, i])).collect()),
            |_| false,
            |_| Vec::new(),
        );
        match crowd {
            Lookup::Name { records, .. } => {
                assert_eq!(records.addrs.len(), MAX_NAME_ADDRS);
                assert_eq!(records.addrs[..2], zone().addrs[..]);
            }
            other => panic!("{other:?}"),
        }
        // A deeper name another hub serves (or an fqdn route) is named too,
        // and the name between it and the apex exists, empty: a resolver
        // minimising query names asks `v2.gw.test` first, and an NXDOMAIN
        // there would end its search.
        let deep = |n: &str| {
            zone_lookup(
                n,
                &zone(),
                |h| (h == "api.v2.gw.test").then(Vec::new),
                |n| {
                    "api.v2.gw.test"
                        .strip_suffix(n)
                        .is_some_and(|h| h.len() > 1 && h.ends_with('.'))
                },
                |_| Vec::new(),
            )
        };
        assert_eq!(deep("api.v2.gw.test"), host("gw.test"));
        assert_eq!(deep("v2.gw.test"), empty);
        assert!(matches!(deep("x.v2.gw.test"), Lookup::Below { .. }));
        assert!(matches!(deep("w2.gw.test"), Lookup::Below { .. }));
        for missing in [
            "nope.gw.test",
            "a.blog.gw.test",
            "x._acme-challenge.gw.test",
            "blog.eu.gw.test",
            "x.hubs.gw.test",
            "ubs.gw.test",
        ] {
            assert!(matches!(zl(missing), Lookup::Below { .. }), "{missing}");
        }
        assert_eq!(
            zl("a.blog.gw.test"),
            Lookup::Below {
                zone: "gw.test".into()
            }
        );
        assert_eq!(
            zl("blog.eu.gw.test"),
            Lookup::Below {
                zone: "eu.gw.test".into()
            }
        );
        for outside in ["gw.test.evil", "xgw.test", "test", "", "other.test"] {
            assert_eq!(zl(outside), Lookup::Outside, "{outside:?}");
        }
        match zl("gw.test") {
            Lookup::Name { zone, records } => {
                assert_eq!(zone, "gw.test");
                assert!(records.apex);
                assert!(records.addrs.is_empty(), "the apex is not served");
                assert_eq!(
                    records.ns,
                    ["ns1.gw.test", "ns.other.test", "ns2.hubs.gw.test"]
                );
            }
            other => panic!("{other:?}"),
        }
        match zl("_acme-challenge.eu.gw.test") {
            Lookup::Name { zone, records } => {
                assert_eq!(zone, "eu.gw.test");
                assert_eq!(records.txt, vec!["token-eu.gw.test".to_string()]);
                assert!(!records.apex && records.addrs.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    fn addrs_of(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("not an address: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn zone_answers_addresses_by_family() {
        let (r, m) = ask(&query("Blog.GW.test.", RecordType::A), true, zl);
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(
            addrs_of(&m),
            vec!["203.0.113.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(m.answers[0].ttl, 60);
        // The owner is the name as asked.
        assert_eq!(m.answers[0].name.to_ascii(), "Blog.GW.test.");
        let (_, m) = ask(&query("blog.gw.test.", RecordType::AAAA), false, zl);
        assert_eq!(
            addrs_of(&m),
            vec!["2001:db8::10".parse::<IpAddr>().unwrap()]
        );
        let (_, m) = ask(&query("blog.gw.test.", RecordType::ANY), true, zl);
        assert_eq!(addrs_of(&m).len(), 2);
        // NODATA for the types a host does not hold.
        for t in [
            RecordType::TXT,
            RecordType::MX,
            RecordType::NS,
            RecordType::SOA,
        ] {
            let (r, m) = ask(&query("blog.gw.test.", t), true, zl);
            assert_eq!(r.rcode, ResponseCode::NoError, "{t}");
            assert!(m.answers.is_empty(), "{t}");
            assert_eq!(m.authorities.len(), 1, "{t}");
            assert_eq!(soa_of(&m.authorities[0]).mname.to_ascii(), "gw.test.");
        }
        // A family the hub has no address of: NODATA too.
        let v4only = |n: &str| {
            let mut z = zone();
            z.addrs.truncate(1);
            zone_lookup(n, &z, served, |_| false, |_| Vec::new())
        };
        let (r, m) = ask(&query("blog.gw.test.", RecordType::AAAA), true, v4only);
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn zone_apex_has_soa_and_ns() {
        let (r, m) = ask(&query("gw.test.", RecordType::NS), true, zl);
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        let ns: Vec<String> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::NS(n) => n.0.to_ascii(),
                other => panic!("not NS: {other:?}"),
            })
            .collect();
        assert_eq!(
            ns,
            vec!["ns1.gw.test.", "ns.other.test.", "ns2.hubs.gw.test."]
        );
        assert_eq!(m.answers[0].ttl, 60);
        let (_, m) = ask(&query("gw.test.", RecordType::SOA), true, zl);
        assert_eq!(m.answers.len(), 1);
        assert_eq!(soa_of(&m.answers[0]).mname.to_ascii(), "gw.test.");
        // The apex is no host unless served.
        let (_, m) = ask(&query("gw.test.", RecordType::A), true, zl);
        assert!(m.answers.is_empty());
        assert_eq!(m.authorities.len(), 1);
        let (_, m) = ask(&query("gw.test.", RecordType::ANY), true, zl);
        assert_eq!(m.answers.len(), 1, "ANY at the apex: the SOA");
        // NS below the apex: NODATA.
        let (_, m) = ask(&query("ns1.gw.test.", RecordType::NS), true, zl);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn zone_unknown_name_is_nxdomain_and_challenge_is_txt() {
        let (r, m) = ask(&query("nope.gw.test.", RecordType::A), true, zl);
        assert_eq!(r.rcode, ResponseCode::NXDomain);
        assert!(m.metadata.authoritative);
        assert_eq!(soa_of(&m.authorities[0]).mname.to_ascii(), "gw.test.");
        let (r, m) = ask(
            &query("_acme-challenge.gw.test.", RecordType::TXT),
            true,
            zl,
        );
        assert_eq!(r.rcode, ResponseCode::NoError);
        assert_eq!(txt_strings(&m.answers[0]), vec![b"token-gw.test".to_vec()]);
        let (r, _) = ask(&query("blog.gw.test.", RecordType::AXFR), false, zl);
        assert_eq!(r.rcode, ResponseCode::Refused);
        let (r, _) = ask(&query("example.org.", RecordType::A), true, zl);
        assert_eq!(r.rcode, ResponseCode::Refused);
    }

    fn any_lookup(name: &str) -> Lookup {
        match name.len() % 4 {
            0 => Lookup::Outside,
            1 => Lookup::Apex {
                zone: "gw.test".to_string(),
                txt: vec![name.to_string(); name.len() % 4],
            },
            2 => Lookup::Name {
                zone: "gw.test".to_string(),
                records: Records {
                    apex: name.len().is_multiple_of(5),
                    txt: Vec::new(),
                    addrs: (0..name.len() % 40)
                        .map(|i| IpAddr::from([10, 0, 0, i as u8]))
                        .chain(
                            (0..name.len() % 30)
                                .map(|i| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16])),
                        )
                        .collect(),
                    ns: vec![name.to_string(), "ns.gw.test".to_string()],
                    ttl: 60,
                },
            },
            _ => Lookup::Below {
                zone: "gw.test".to_string(),
            },
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = respond(&bytes, true, any_lookup);
            let _ = respond(&bytes, false, any_lookup);
            if let Ok(r) = respond_truncated(&bytes) {
                // Never more than was sent: nothing to amplify.
                prop_assert!(r.bytes.len() <= bytes.len());
            }
        }

        #[test]
        fn mutated_vector_never_panics(
            edits in proptest::collection::vec((0usize..64, any::<u8>()), 1..8),
            udp in any::<bool>(),
        ) {
            let mut q = DIG_TXT;
            for (i, b) in edits {
                q[i] = b;
            }
            if let Ok(r) = respond(&q, udp, apex(&["v"])) {
                prop_assert_eq!(&r.bytes[0..2], &q[0..2]);
                prop_assert!(Message::from_vec(&r.bytes).is_ok());
            }
        }

        #[test]
        fn zone_lookup_keeps_to_its_zones(
            labels in proptest::collection::vec(prop_oneof![
                Just("gw".to_string()), Just("test".to_string()), Just("eu".to_string()),
                Just("_acme-challenge".to_string()), Just("blog".to_string()),
                Just("ns1".to_string()), "[a-z0-9.-]{0,6}",
            ], 0..5),
        ) {
            let name = labels.join(".");
            let in_zone = name == "gw.test" || name.ends_with(".gw.test");
            match zl(&name) {
                Lookup::Outside => prop_assert!(!in_zone, "{}", name),
                Lookup::Below { zone } | Lookup::Name { zone, .. } => {
                    prop_assert!(in_zone, "{}", name);
                    prop_assert!(name == zone || name.ends_with(&format!(".{zone}")), "{} in {}", name, zone);
                }
                Lookup::Apex { .. } => prop_assert!(false, "zones give Name"),
            }
            if let Lookup::Name { records, .. } = zl(&name) {
                if !records.addrs.is_empty() {
                    prop_assert!(served(&name).is_some() || name == "ns1.gw.test" || name == "ns2.hubs.gw.test", "{}", name);
                }
            }
        }

        #[test]
        fn valid_queries_get_parseable_replies(
            id in any::<u16>(),
            labels in proptest::collection::vec("[a-zA-Z0-9_-]{1,20}", 0..5),
            qtype in any::<u16>(),
            class in prop_oneof![Just(1u16), Just(3), Just(255), any::<u16>()],
            edns in proptest::option::of((any::<u16>(), 0u8..2, any::<bool>())),
            rd in any::<bool>(),
            udp in any::<bool>(),
        ) {
            let name = Name::from_labels(labels.iter().map(|l| l.as_bytes())).unwrap();
            let mut m = Message::new(id, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = rd;
            let mut q = Query::query(name, RecordType::from(qtype));
            q.set_query_class(DNSClass::from(class));
            m.add_query(q.clone());
            if let Some((payload, version, dnssec_ok)) = edns {
                let mut e = Edns::new();
                e.set_max_payload(payload).set_version(version).set_dnssec_ok(dnssec_ok);
                m.set_edns(e);
            }
            let Ok(bytes) = m.to_vec() else { return Ok(()) };
            let reply = respond(&bytes, udp, any_lookup).unwrap();
            let parsed = Message::from_vec(&reply.bytes).unwrap();
            prop_assert_eq!(parsed.metadata.id, id);
            prop_assert_eq!(parsed.metadata.message_type, MessageType::Response);
            prop_assert_eq!(parsed.metadata.recursion_desired, rd);
            prop_assert!(!parsed.metadata.recursion_available);
            prop_assert_eq!(u16::from(parsed.metadata.response_code), u16::from(reply.rcode));
            prop_assert_eq!(parsed.edns.is_some(), edns.is_some());
            prop_assert_eq!(parsed.queries.len(), 1);
            prop_assert!(parsed.queries[0].name().eq_case(q.name()));
            if udp {
                prop_assert!(reply.bytes.len() <= usize::from(UDP_EDNS_MAX));
            }
        }
    }
}
