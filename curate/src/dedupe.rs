//! Exact and near-duplicate detection.
//!
//! Exact: xxh3-128 of the normalised text (lowercase, punctuation stripped,
//! whitespace collapsed). Near: MinHash over word 5-grams with 112 hash
//! functions, LSH in 14 bands of 8 rows (the datatrove scheme, which catches
//! pairs with Jaccard above ~0.75 with high probability) and union-find to
//! turn colliding pairs into clusters.
//!
//! The MinHash loop is written by hand rather than taken from a crate: the
//! available Rust MinHash crates allocate per shingle or hash each shingle once
//! per permutation, which is the cost this module exists to avoid.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use xxhash_rust::xxh3::{xxh3_64, xxh3_128};

use crate::error::CurateError;

/// Lowercases, replaces punctuation with spaces and collapses whitespace,
/// writing into `out` (cleared first) so callers can reuse one buffer.
pub fn normalize_into(text: &str, out: &mut String) {
    out.clear();
    let mut pending_space = false;
    for ch in text.chars() {
        if ch.is_alphanumeric() {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            if ch.is_ascii() {
                out.push(ch.to_ascii_lowercase());
            } else {
                out.extend(ch.to_lowercase());
            }
        } else {
            pending_space = true;
        }
    }
}

/// The normalised form hashed by [`exact_hash`].
pub fn normalize_text(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    normalize_into(text, &mut s);
    s
}

/// 128-bit fingerprint of the normalised text: equal for texts that differ
/// only in case, punctuation or spacing.
pub fn exact_hash(text: &str) -> u128 {
    xxh3_128(normalize_text(text).as_bytes())
}

/// Groups of indices whose texts have the same [`exact_hash`] (groups of two
/// or more, each sorted, in order of first member).
pub fn exact_duplicates<S: AsRef<str>>(texts: &[S]) -> Vec<Vec<usize>> {
    let mut groups: HashMap<u128, Vec<usize>> = HashMap::with_capacity(texts.len());
    for (i, t) in texts.iter().enumerate() {
        groups.entry(exact_hash(t.as_ref())).or_default().push(i);
    }
    let mut out: Vec<Vec<usize>> = groups.into_values().filter(|g| g.len() > 1).collect();
    out.sort_by_key(|g| g[0]);
    out
}

/// A MinHash signature: per hash function, the minimum over the shingles.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Signature(pub Vec<u32>);

impl Signature {
    /// Fraction of agreeing slots, an unbiased estimate of the Jaccard
    /// similarity of the two shingle sets.
    pub fn jaccard_estimate(&self, other: &Signature) -> f64 {
        let n = self.0.len().min(other.0.len());
        if n == 0 {
            return 0.0;
        }
        let same = self.0.iter().zip(&other.0).filter(|(a, b)| a == b).count();
        same as f64 / n as f64
    }
}

/// MinHash over word n-grams with `num_perm` universal hash functions
/// `h_i(x) = (a_i * x + b_i mod 2^64) >> 32` applied to one 32-bit xxh3 hash
/// per shingle (see `min_hash_kernel` for why not datasketch's Mersenne form).
///
/// The loop over the permutations is plain 64-bit arithmetic that vectorises
/// (with AVX2 when the CPU has it, chosen at run time).
#[derive(Clone, Debug)]
pub struct MinHasher {
    ngram: usize,
    a: Vec<u64>,
    b: Vec<u64>,
}

impl MinHasher {
    /// `num_perm` hash functions over word `ngram`-grams, drawn from `seed`.
    pub fn new(num_perm: usize, ngram: usize, seed: u64) -> Result<Self, CurateError> {
        if num_perm == 0 || ngram == 0 {
            return Err(CurateError::InvalidParameter(
                "num_perm and ngram must be positive".into(),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Odd multipliers, as multiply-shift hashing requires.
        let a = (0..num_perm).map(|_| rng.random::<u64>() | 1).collect();
        let b = (0..num_perm).map(|_| rng.random::<u64>()).collect();
        Ok(MinHasher { ngram, a, b })
    }

    /// Number of hash functions (signature length).
    pub fn num_perm(&self) -> usize {
        self.a.len()
    }

    /// Shingle size in words.
    pub fn ngram(&self) -> usize {
        self.ngram
    }

    /// Signature of `text` after [`normalize_text`]; texts shorter than the
    /// n-gram size hash as one shingle so they still match their copies.
    pub fn signature(&self, text: &str) -> Signature {
        let mut scratch = Scratch::default();
        self.signature_with(text, &mut scratch)
    }

    fn signature_with(&self, text: &str, scratch: &mut Scratch) -> Signature {
        normalize_into(text, &mut scratch.norm);
        scratch.words.clear();
        scratch.words.extend(
            scratch
                .norm
                .split(' ')
                .filter(|w| !w.is_empty())
                .map(|w| xxh3_64(w.as_bytes())),
        );
        let n = self.ngram;
        let words = &scratch.words;
        scratch.shingles.clear();
        if words.len() < n {
            if !words.is_empty() {
                scratch.shingles.push(shingle_hash(words));
            }
        } else {
            scratch.shingles.extend(words.windows(n).map(shingle_hash));
        }
        let mut mins = vec![u32::MAX; self.a.len()];
        min_hash(&mut mins, &self.a, &self.b, &scratch.shingles);
        Signature(mins)
    }

    /// Signatures of many documents, in parallel over documents.
    pub fn signatures<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Vec<Signature> {
        texts
            .par_iter()
            .map_init(Scratch::default, |scratch, t| {
                self.signature_with(t.as_ref(), scratch)
            })
            .collect()
    }
}

/// Permutations processed together, so their constants and running minima
/// stay in registers while the shingles stream past.
const LANES: usize = 8;

/// Folds every shingle into the running minima; the one hot loop.
///
/// Each hash is Dietzfelbinger's multiply-add-shift `(a*x + b mod 2^64) >> 32`
/// with random 64-bit `a`, `b` and 32-bit `x`, a strongly universal family.
/// It replaces datasketch's `(a*x + b) mod (2^61-1)`: with `a < 2^32` (to stay
/// in 64-bit arithmetic) the Mersenne form wraps at most 8 times over the key
/// range, is nearly linear in `x`, and its minima correlate across hash
/// functions (measured: precision fell to 0.98 on the synthetic benchmark);
/// full 61-bit `a` would need 128-bit products. Multiply-add-shift needs two
/// 32x32->64 multiplies per lane and vectorises.
#[inline(always)]
fn min_hash_kernel(mins: &mut [u32], a: &[u64], b: &[u64], shingles: &[u32]) {
    let k = mins.len();
    let mut i = 0;
    while i < k {
        let width = LANES.min(k - i);
        let mut aa = [0u64; LANES];
        let mut bb = [0u64; LANES];
        aa[..width].copy_from_slice(&a[i..i + width]);
        bb[..width].copy_from_slice(&b[i..i + width]);
        let mut m = [u32::MAX; LANES];
        for &h in shingles {
            let x = h as u64;
            for l in 0..LANES {
                let v = aa[l].wrapping_mul(x).wrapping_add(bb[l]);
                m[l] = m[l].min((v >> 32) as u32);
            }
        }
        mins[i..i + width].copy_from_slice(&m[..width]);
        i += width;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn min_hash_avx2(mins: &mut [u32], a: &[u64], b: &[u64], shingles: &[u32]) {
    min_hash_kernel(mins, a, b, shingles)
}

fn min_hash(mins: &mut [u32], a: &[u64], b: &[u64], shingles: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { min_hash_avx2(mins, a, b, shingles) };
        return;
    }
    min_hash_kernel(mins, a, b, shingles)
}

/// Reusable buffers so a signature costs no allocation per shingle.
#[derive(Default)]
struct Scratch {
    norm: String,
    words: Vec<u64>,
    shingles: Vec<u32>,
}

fn shingle_hash(words: &[u64]) -> u32 {
    let mut buf = [0u8; 8 * 16];
    let n = words.len().min(16);
    for (i, w) in words[..n].iter().enumerate() {
        buf[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let mut h = xxh3_64(&buf[..n * 8]);
    for w in &words[n..] {
        h = xxh3_64(&[h.to_le_bytes(), w.to_le_bytes()].concat());
    }
    h as u32
}

/// Disjoint-set forest with path halving and union by size.
#[derive(Clone, Debug, Default)]
pub struct UnionFind {
    parent: Vec<usize>,
    size: Vec<usize>,
}

impl UnionFind {
    /// `n` singleton sets `0..n`.
    pub fn new(n: usize) -> Self {
        UnionFind {
            parent: (0..n).collect(),
            size: vec![1; n],
        }
    }

    /// Grows the forest so that `id` is a valid element.
    pub fn ensure(&mut self, id: usize) {
        while self.parent.len() <= id {
            self.parent.push(self.parent.len());
            self.size.push(1);
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.parent.len()
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    /// Representative of `x`'s set (halves paths as it goes).
    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    /// Merges the sets of `a` and `b`; true if they were separate.
    pub fn union(&mut self, a: usize, b: usize) -> bool {
        let (mut ra, mut rb) = (self.find(a), self.find(b));
        if ra == rb {
            return false;
        }
        if self.size[ra] < self.size[rb] {
            std::mem::swap(&mut ra, &mut rb);
        }
        self.parent[rb] = ra;
        self.size[ra] += self.size[rb];
        true
    }

    /// Sets with at least two members, each sorted, ordered by first member.
    pub fn groups(&mut self) -> Vec<Vec<usize>> {
        let mut by_root: HashMap<usize, Vec<usize>> = HashMap::new();
        for i in 0..self.parent.len() {
            let r = self.find(i);
            by_root.entry(r).or_default().push(i);
        }
        let mut out: Vec<Vec<usize>> = by_root.into_values().filter(|g| g.len() > 1).collect();
        out.sort_by_key(|g| g[0]);
        out
    }
}

/// Banded locality-sensitive hashing over MinHash signatures. Documents that
/// agree on all rows of any band are unioned as they are inserted, so memory
/// is one bucket entry per (band, distinct band value), not a pair list.
#[derive(Clone, Debug)]
pub struct Lsh {
    bands: usize,
    rows: usize,
    buckets: Vec<HashMap<u64, usize>>,
    uf: UnionFind,
}

impl Lsh {
    /// `bands * rows` must not exceed the signature length.
    pub fn new(bands: usize, rows: usize) -> Result<Self, CurateError> {
        if bands == 0 || rows == 0 {
            return Err(CurateError::InvalidParameter(
                "bands and rows must be positive".into(),
            ));
        }
        Ok(Lsh {
            bands,
            rows,
            buckets: vec![HashMap::new(); bands],
            uf: UnionFind::default(),
        })
    }

    /// Probability that a pair with Jaccard `s` shares at least one band.
    pub fn collision_probability(&self, s: f64) -> f64 {
        1.0 - (1.0 - s.powi(self.rows as i32)).powi(self.bands as i32)
    }

    /// Adds document `id` (ids index a dense array; use 0..n).
    pub fn insert(&mut self, id: usize, sig: &Signature) -> Result<(), CurateError> {
        if sig.0.len() < self.bands * self.rows {
            return Err(CurateError::InvalidParameter(format!(
                "signature has {} values, LSH needs {} bands x {} rows",
                sig.0.len(),
                self.bands,
                self.rows
            )));
        }
        self.uf.ensure(id);
        for (band, bucket) in self.buckets.iter_mut().enumerate() {
            let slice = &sig.0[band * self.rows..(band + 1) * self.rows];
            let mut bytes = [0u8; 4 * 32];
            let m = slice.len().min(32);
            for (i, v) in slice[..m].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
            }
            let key = xxh3_64(&bytes[..m * 4]) ^ (slice.len() as u64).rotate_left(32);
            match bucket.get(&key) {
                Some(&first) => {
                    self.uf.union(first, id);
                }
                None => {
                    bucket.insert(key, id);
                }
            }
        }
        Ok(())
    }

    /// Candidate duplicate clusters (two or more members).
    pub fn clusters(&mut self) -> Vec<Vec<usize>> {
        self.uf.groups()
    }
}

/// Signatures, LSH and clustering in one call, with the datatrove defaults
/// (112 permutations, word 5-grams, 14 bands x 8 rows).
pub fn near_duplicate_clusters<S: AsRef<str> + Sync>(texts: &[S], seed: u64) -> Vec<Vec<usize>> {
    let hasher = MinHasher::new(112, 5, seed).expect("valid defaults");
    let sigs = hasher.signatures(texts);
    let mut lsh = Lsh::new(14, 8).expect("valid defaults");
    for (i, s) in sigs.iter().enumerate() {
        lsh.insert(i, s).expect("112 >= 14 * 8");
    }
    lsh.clusters()
}

/// The member of `cluster` with the smallest `key` (e.g. `(!verified, len)`
/// to keep the shortest verified trace); ties go to the earlier member.
pub fn representative<K: Ord>(cluster: &[usize], mut key: impl FnMut(usize) -> K) -> Option<usize> {
    cluster.iter().copied().min_by_key(|&i| key(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn words(n: usize, seed: u64) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| format!("w{}", rng.random_range(0..1_000_000u32)))
            .collect()
    }

    fn shingles(text: &str, n: usize) -> HashSet<String> {
        let norm = normalize_text(text);
        let w: Vec<&str> = norm.split(' ').collect();
        w.windows(n).map(|g| g.join(" ")).collect()
    }

    fn true_jaccard(a: &str, b: &str) -> f64 {
        let (x, y) = (shingles(a, 5), shingles(b, 5));
        x.intersection(&y).count() as f64 / x.union(&y).count() as f64
    }

    #[test]
    fn normalisation_and_exact_hash() {
        assert_eq!(
            normalize_text("  Hello,   WORLD!\n\tÉté "),
            "hello world été"
        );
        assert_eq!(exact_hash("Hello, world!"), exact_hash("hello   WORLD"));
        assert_ne!(exact_hash("hello world"), exact_hash("hello there"));
        let texts = ["A b c.", "x", "a B c", "y", "X!"];
        assert_eq!(exact_duplicates(&texts), vec![vec![0, 2], vec![1, 4]]);
    }

    #[test]
    fn minhash_estimates_known_jaccard() {
        let h = MinHasher::new(256, 5, 7).unwrap();
        let base = words(400, 1);
        for keep in [400usize, 300, 200, 100] {
            // Replace the tail to get a controlled overlap.
            let mut other = base[..keep].to_vec();
            other.extend(words(400 - keep, 99 + keep as u64));
            let (a, b) = (base.join(" "), other.join(" "));
            let truth = true_jaccard(&a, &b);
            let est = h.signature(&a).jaccard_estimate(&h.signature(&b));
            // Standard error sqrt(J(1-J)/256) <= 0.032; allow ~3.5 sigma.
            assert!(
                (est - truth).abs() < 0.11,
                "keep {keep}: est {est} truth {truth}"
            );
        }
        let a = words(300, 5).join(" ");
        let b = words(300, 6).join(" ");
        assert!(h.signature(&a).jaccard_estimate(&h.signature(&b)) < 0.05);
        assert_eq!(h.signature(&a), h.signature(&a.to_uppercase()));
    }

    #[test]
    fn short_texts_still_match_copies() {
        let h = MinHasher::new(112, 5, 1).unwrap();
        assert_eq!(h.signature("two words"), h.signature("Two words!"));
        assert_ne!(h.signature("two words"), h.signature("three words"));
        assert!(MinHasher::new(0, 5, 1).is_err());
    }

    #[test]
    fn lsh_finds_planted_pair_not_unrelated() {
        let h = MinHasher::new(112, 5, 42).unwrap();
        let mut docs: Vec<String> = (0..50).map(|i| words(300, 1000 + i).join(" ")).collect();
        // Doc 50 is doc 7 with two short edits (Jaccard ~0.9).
        let mut copy = words(300, 1007);
        copy[100] = "edited".into();
        copy[200] = "again".into();
        docs.push(copy.join(" "));
        let sigs = h.signatures(&docs);
        let mut lsh = Lsh::new(14, 8).unwrap();
        for (i, s) in sigs.iter().enumerate() {
            lsh.insert(i, s).unwrap();
        }
        assert_eq!(lsh.clusters(), vec![vec![7, 50]]);
        assert_eq!(near_duplicate_clusters(&docs, 42), vec![vec![7, 50]]);
        assert!(lsh.collision_probability(0.9) > 0.99);
        assert!(lsh.collision_probability(0.3) < 0.01);
        let mut small = Lsh::new(20, 8).unwrap();
        assert!(small.insert(0, &sigs[0]).is_err());
    }

    #[test]
    fn union_find_groups() {
        let mut uf = UnionFind::new(6);
        assert!(uf.union(0, 3));
        assert!(uf.union(3, 5));
        assert!(!uf.union(5, 0));
        assert!(uf.union(1, 2));
        assert_eq!(uf.find(5), uf.find(0));
        assert_ne!(uf.find(1), uf.find(0));
        assert_eq!(uf.groups(), vec![vec![0, 3, 5], vec![1, 2]]);
        uf.ensure(9);
        assert_eq!(uf.len(), 10);
    }

    #[test]
    fn representative_by_key() {
        let lens = [50, 20, 20, 70];
        assert_eq!(representative(&[0, 1, 2, 3], |i| lens[i]), Some(1));
        assert_eq!(
            representative(&[0, 3], |i| std::cmp::Reverse(lens[i])),
            Some(3)
        );
        assert_eq!(representative(&[], |i: usize| i), None);
    }
}
