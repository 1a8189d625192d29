//! Benchmark decontamination by word n-gram overlap, as open-r1 does it:
//! lowercase, strip punctuation, split on whitespace, and flag a prompt that
//! shares any n-gram (default n = 8) with a benchmark problem.

use std::collections::HashMap;

use xxhash_rust::xxh3::xxh3_64;

use crate::error::CurateError;

/// The benchmark item a text overlaps with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match {
    /// Name given to [`NgramIndex::add`] (e.g. "aime24").
    pub benchmark: String,
    /// Item id within that benchmark.
    pub item_id: String,
    /// The shared n-gram in normalised form (the whole normalised text for
    /// short texts).
    pub ngram: String,
}

/// open-r1's normalisation: lowercase, punctuation removed (not replaced, so
/// "don't" becomes "dont"), split on whitespace.
pub fn words(text: &str) -> Vec<String> {
    let lowered = text.to_lowercase();
    lowered
        .split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

fn ngram_hash(ws: &[String]) -> u64 {
    let mut h = 0u64;
    for w in ws {
        h = h.rotate_left(17) ^ xxh3_64(w.as_bytes());
        h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    h
}

fn full_hash(ws: &[String]) -> u64 {
    xxh3_64(ws.join(" ").as_bytes())
}

/// Index of benchmark n-grams, each mapped to the first item that contains it.
///
/// Texts with fewer than `n` words have no n-gram; they are indexed and looked
/// up by equality of their whole normalised text instead, so a short benchmark
/// answer or question is still caught when copied verbatim (up to case and
/// punctuation) but never by partial overlap.
#[derive(Clone, Debug)]
pub struct NgramIndex {
    n: usize,
    owners: Vec<(String, String)>,
    ngrams: HashMap<u64, u32>,
    short: HashMap<u64, u32>,
}

impl NgramIndex {
    /// An empty index over word `n`-grams.
    pub fn new(n: usize) -> Result<Self, CurateError> {
        if n == 0 {
            return Err(CurateError::InvalidParameter("n must be positive".into()));
        }
        Ok(NgramIndex {
            n,
            owners: Vec::new(),
            ngrams: HashMap::new(),
            short: HashMap::new(),
        })
    }

    /// The n-gram size in words.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of distinct n-grams indexed.
    pub fn len(&self) -> usize {
        self.ngrams.len()
    }

    /// True when nothing has been indexed.
    pub fn is_empty(&self) -> bool {
        self.ngrams.is_empty() && self.short.is_empty()
    }

    /// Indexes a benchmark item's text (problem, and answer if wanted).
    pub fn add(&mut self, benchmark: &str, item_id: &str, text: &str) {
        let owner = self.owners.len() as u32;
        self.owners
            .push((benchmark.to_string(), item_id.to_string()));
        let ws = words(text);
        if ws.is_empty() {
            return;
        }
        if ws.len() < self.n {
            self.short.entry(full_hash(&ws)).or_insert(owner);
            return;
        }
        for g in ws.windows(self.n) {
            self.ngrams.entry(ngram_hash(g)).or_insert(owner);
        }
    }

    /// The first n-gram of `text` found in the index, if any.
    pub fn find(&self, text: &str) -> Option<Match> {
        let ws = words(text);
        if ws.is_empty() {
            return None;
        }
        let make = |owner: u32, ngram: String| {
            let (b, i) = &self.owners[owner as usize];
            Match {
                benchmark: b.clone(),
                item_id: i.clone(),
                ngram,
            }
        };
        if ws.len() < self.n {
            return self
                .short
                .get(&full_hash(&ws))
                .map(|&o| make(o, ws.join(" ")));
        }
        ws.windows(self.n).find_map(|g| {
            self.ngrams
                .get(&ngram_hash(g))
                .map(|&o| make(o, g.join(" ")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AIME: &str = "Every morning Aya goes for a $9$-kilometer-long walk and stops at a coffee shop afterwards.";

    #[test]
    fn normalisation_matches_open_r1() {
        assert_eq!(words("Don't STOP, x=5!"), vec!["dont", "stop", "x5"]);
    }

    #[test]
    fn ngram_hit_and_miss() {
        let mut idx = NgramIndex::new(8).unwrap();
        idx.add("aime24", "60", AIME);
        idx.add(
            "math500",
            "test/1",
            "Compute the sum of the first one hundred positive odd integers please.",
        );
        let hit = idx
            .find("Problem: every morning, Aya goes for a 9-kilometer-long walk and then rests.")
            .unwrap();
        assert_eq!(
            (hit.benchmark.as_str(), hit.item_id.as_str()),
            ("aime24", "60")
        );
        assert_eq!(
            hit.ngram,
            "every morning aya goes for a 9kilometerlong walk"
        );
        // Seven shared words in a row are not enough at n = 8.
        assert_eq!(
            idx.find("every morning aya goes for a 9kilometerlong run today"),
            None
        );
        assert_eq!(
            idx.find("A completely unrelated question about triangles and circles here."),
            None
        );
        assert!(!idx.is_empty());
    }

    #[test]
    fn short_texts_match_only_by_equality() {
        let mut idx = NgramIndex::new(8).unwrap();
        idx.add("gsm8k", "q1", "What is 2 + 2?");
        assert_eq!(idx.find("what is 2 2").unwrap().item_id, "q1");
        assert_eq!(idx.find("What is 2 + 2? Explain.").map(|m| m.item_id), None);
        assert_eq!(idx.find("what is 3 3"), None);
        assert_eq!(idx.find("  ?! "), None);
        assert!(NgramIndex::new(0).is_err());
    }

    #[test]
    fn first_owner_wins() {
        let mut idx = NgramIndex::new(3).unwrap();
        idx.add("a", "1", "one two three four");
        idx.add("b", "2", "two three four five");
        assert_eq!(idx.find("x two three four y").unwrap().benchmark, "a");
    }
}
