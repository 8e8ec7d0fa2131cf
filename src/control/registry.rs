//! See docs/control.md.
