//! Host side of the guest agent: dialing it over each transport.
