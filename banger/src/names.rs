//! Readable names for VMs made without `--name`: an adjective and an
//! animal (`brisk-otter`), both DNS labels, so `<name>.vm` resolves.

const ADJECTIVES: &[&str] = &[
    "able", "agile", "amber", "ample", "azure", "bold", "brave", "brisk", "bright", "calm",
    "candid", "civil", "clever", "cosmic", "crisp", "curly", "dapper", "daring", "dusty", "eager",
    "early", "easy", "fancy", "fluffy", "frosty", "gentle", "giant", "glad", "golden", "grand",
    "happy", "hardy", "humble", "icy", "jolly", "keen", "kind", "lively", "lucky", "lunar",
    "merry", "mighty", "misty", "modest", "noble", "nimble", "polar", "proud", "quick", "quiet",
    "rapid", "rosy", "rusty", "shiny", "silent", "sleepy", "solar", "spry", "steady", "sunny",
    "swift", "tidy", "vivid", "witty",
];

const ANIMALS: &[&str] = &[
    "alpaca", "badger", "beaver", "bison", "bobcat", "condor", "corgi", "coyote", "crane", "dingo",
    "dolphin", "donkey", "eagle", "egret", "falcon", "ferret", "finch", "gecko", "gibbon",
    "gopher", "heron", "hippo", "husky", "ibis", "iguana", "jackal", "jaguar", "koala", "lemur",
    "llama", "lynx", "magpie", "marmot", "marten", "meerkat", "mink", "moose", "narwhal", "ocelot",
    "orca", "osprey", "otter", "owl", "panda", "parrot", "pelican", "penguin", "puffin", "quokka",
    "rabbit", "raven", "robin", "salmon", "seal", "sparrow", "squid", "stoat", "tapir", "tiger",
    "toucan", "turtle", "walrus", "wombat", "yak",
];

/// A random `adjective-animal` name, none of `taken`; after a few draws
/// that all are, a number is added (`brisk-otter-7`).
pub fn random(taken: &[&str]) -> String {
    let mut bytes = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    let mut seed = u64::from_le_bytes(bytes);
    if seed == 0 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        seed = now.map_or(1, |d| u64::from(d.subsec_nanos()) | 1);
    }
    let mut next = |n: usize| {
        // xorshift64: enough to walk a small table.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        usize::try_from(seed % n as u64).unwrap_or(0)
    };
    let mut draw = || {
        format!(
            "{}-{}",
            ADJECTIVES[next(ADJECTIVES.len())],
            ANIMALS[next(ANIMALS.len())]
        )
    };
    for _ in 0..16 {
        let name = draw();
        if !taken.contains(&name.as_str()) {
            return name;
        }
    }
    let base = draw();
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken.contains(&n.as_str()))
        .unwrap_or(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_makes_a_valid_label_and_words_are_unique() {
        for list in [ADJECTIVES, ANIMALS] {
            let mut seen = std::collections::BTreeSet::new();
            for w in list {
                assert!(w.bytes().all(|b| b.is_ascii_lowercase()), "{w}");
                assert!(seen.insert(*w), "{w} twice");
            }
        }
        let longest = ADJECTIVES.iter().map(|a| a.len()).max().unwrap_or(0)
            + ANIMALS.iter().map(|a| a.len()).max().unwrap_or(0)
            + 1;
        assert!(
            longest + 4 <= 63,
            "a name with a number must stay a DNS label"
        );
    }

    #[test]
    fn names_are_readable_and_avoid_taken_ones() {
        let name = random(&[]);
        let (adjective, animal) = name.split_once('-').expect("adjective-animal");
        assert!(ADJECTIVES.contains(&adjective), "{name}");
        assert!(ANIMALS.contains(&animal), "{name}");
        let many: std::collections::BTreeSet<String> = (0..50).map(|_| random(&[])).collect();
        assert!(many.len() > 40, "names repeat too often: {many:?}");
        // Every plain name taken: a numbered one.
        let all: Vec<String> = ADJECTIVES
            .iter()
            .flat_map(|a| ANIMALS.iter().map(move |b| format!("{a}-{b}")))
            .collect();
        let taken: Vec<&str> = all.iter().map(String::as_str).collect();
        let name = random(&taken);
        assert!(!taken.contains(&name.as_str()), "{name}");
        assert!(
            name.rsplit_once('-')
                .is_some_and(|(_, n)| n.parse::<u32>().is_ok()),
            "{name}"
        );
    }
}
