//! The UAPI text protocol: any bytes, split into lines, must give a clean error
//! or a parsed request, never a panic.
#![no_main]
use gatewire::wg::uapi::{parse_op, SetParser};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    if let Some(first) = lines.next() {
        let _ = parse_op(first);
    }
    let mut p = SetParser::new();
    for l in lines {
        if l.is_empty() {
            break;
        }
        if p.feed(l).is_err() {
            break;
        }
    }
    let _ = p.finish();
});
