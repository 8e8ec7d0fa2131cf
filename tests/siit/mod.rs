//! Where the SIIT vector tests find Jool's graybox vectors, shared by
//! `xlat_vectors.rs` and `xlat_tun_vectors.rs`.

use std::path::PathBuf;

/// Where Jool's graybox SIIT vectors lie: `GATEWIRE_SIIT_VECTORS`, else
/// `shared/vectors/jool-graybox/` beside the checkout (they are GPL-2.0 test
/// data, kept out of this repository).
pub fn vectors() -> String {
    let dir = std::env::var("GATEWIRE_SIIT_VECTORS").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/vectors/jool-graybox"
        )
        .to_string()
    });
    assert!(
        std::path::Path::new(&dir).join("siit-cases.tsv").is_file(),
        "no SIIT vectors at {dir} (Jool's graybox suite: put it at \
         ../shared/vectors/jool-graybox beside the checkout, or set \
         GATEWIRE_SIIT_VECTORS; docs/testing.md)"
    );
    dir
}

/// The bytes of the vector file `rel` (a path under [`vectors`]).
pub fn read(rel: &str) -> Vec<u8> {
    let p: PathBuf = [vectors().as_str(), rel].iter().collect();
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
