//! The data path's IP header views over decrypted packets.
#![no_main]
use gatewire::wg::packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = packet::addrs(data);
    let mut buf = data.to_vec();
    let _ = packet::decrement_hop_limit(&mut buf);
});
