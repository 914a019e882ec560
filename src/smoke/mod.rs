//! Boot smoke: prove in QEMU that an image boots and its services work.
//! (Being written; see issue 3.)
