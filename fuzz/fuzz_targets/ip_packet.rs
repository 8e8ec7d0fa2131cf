//! The data path's IP header views over decrypted packets, and the message
//! indexes the tunnel's liveness reads from datagrams as they arrive.
#![no_main]
use gatewire::wg::{liveness, packet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = packet::addrs(data);
    let mut buf = data.to_vec();
    let _ = packet::decrement_hop_limit(&mut buf);
    let answers = liveness::Answers::default();
    let _ = liveness::proves_two_way(data);
    answers.answered(data);
    answers.received(data);
    let _ = answers.confirmed();
});
