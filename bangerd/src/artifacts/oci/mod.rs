//! OCI images: layers applied onto a root directory (`layers`).
//! Registry pulls and the ext4 image built from the result follow.

pub mod layers;
