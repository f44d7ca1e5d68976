//! Field-by-field decoding of the node tree, collecting every error instead of stopping at the
//! first (which is all serde can do).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;

use crate::interpolate::interpolate;
use crate::yaml::{self, Kind, Node};
use crate::{ConfigError, Location};

/// The outcome of reading one field. `Invalid` means an error was already recorded, so callers
/// fall back quietly instead of piling a second error on the same node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Field<T> {
    Absent,
    Invalid,
    Value(T),
}

impl<T> Field<T> {
    pub(crate) fn or(self, default: T) -> T {
        match self {
            Field::Value(value) => value,
            Field::Absent | Field::Invalid => default,
        }
    }

    pub(crate) fn ok(self) -> Option<T> {
        match self {
            Field::Value(value) => Some(value),
            Field::Absent | Field::Invalid => None,
        }
    }

    pub(crate) fn is_present(&self) -> bool {
        !matches!(self, Field::Absent)
    }

    pub(crate) fn map<U>(self, f: impl FnOnce(T) -> U) -> Field<U> {
        match self {
            Field::Value(value) => Field::Value(f(value)),
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        }
    }
}

/// One key of a mapping with the position of the key itself, which is where errors about the
/// key (unknown, reserved, badly named) point.
pub(crate) struct Entry<'n> {
    pub(crate) key: &'n str,
    pub(crate) key_location: Location,
    pub(crate) value: &'n Node,
}

/// The entries of one mapping, with the mapping's path.
pub(crate) struct Fields<'n> {
    pub(crate) path: String,
    entries: Vec<Entry<'n>>,
}

impl<'n> Fields<'n> {
    pub(crate) fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|entry| entry.key == key)
            .map(|entry| entry.value)
    }

    pub(crate) fn path_of(&self, key: &str) -> String {
        child(&self.path, key)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'n str, &'n Node)> + '_ {
        self.entries.iter().map(|entry| (entry.key, entry.value))
    }
}

/// Declared names (functions, dead letters) in file order, for suggestions, with a set for
/// lookups: every reference is checked against them, and a file may declare thousands.
pub(crate) struct Names<'a> {
    order: Vec<&'a str>,
    set: HashSet<&'a str>,
}

impl<'a> Names<'a> {
    pub(crate) fn new(order: Vec<&'a str>) -> Self {
        let set = order.iter().copied().collect();
        Names { order, set }
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.set.contains(name)
    }

    pub(crate) fn as_slice(&self) -> &[&'a str] {
        &self.order
    }
}

pub(crate) fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Scalar keys in file order, the first of duplicated keys only: the rest are reported once by
/// [`Decoder::record_locations`] and otherwise ignored. A set, since a file may hold hundreds
/// of thousands of keys in one mapping.
fn unique_entries(entries: &[(Node, Node)]) -> Vec<Entry<'_>> {
    let mut seen = HashSet::with_capacity(entries.len());
    let mut unique = Vec::new();
    for (key, value) in entries {
        if let Kind::Scalar { text, .. } = &key.kind
            && seen.insert(text.as_str())
        {
            unique.push(Entry {
                key: text,
                key_location: key.location,
                value,
            });
        }
    }
    unique
}

pub(crate) struct Decoder<'a> {
    origin: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    pub(crate) errors: Vec<ConfigError>,
    pub(crate) locations: BTreeMap<String, Location>,
    /// Every error found, also those past [`MAX_ERRORS`] that are counted but not kept.
    pub(crate) found: usize,
    /// What [`Decoder::locations`] takes so far, against [`MAX_LOCATION_BYTES`].
    location_bytes: usize,
    /// Set once the index of locations went over its budget: decoding would then build as
    /// many paths again, so the file is refused with that one error.
    pub(crate) over_budget: bool,
}

/// The most errors kept: a file of a million wrong keys gets a readable report (and a count of
/// the rest) instead of a million lines held in memory.
pub(crate) const MAX_ERRORS: usize = 1000;

/// The most the index of node positions may take, counted as the paths' bytes plus
/// [`LOCATION_OVERHEAD`] each. A path repeats every key above its node, so a long key over a
/// long list costs the key's length once per item: a few megabytes of file could otherwise
/// make terabytes of paths.
pub(crate) const MAX_LOCATION_BYTES: usize = 256 * 1024 * 1024;
/// The map entry and `Location` beside each path.
const LOCATION_OVERHEAD: usize = 64;

impl<'a> Decoder<'a> {
    pub(crate) fn new(origin: &'a str, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Decoder {
            origin,
            env,
            errors: Vec::new(),
            locations: BTreeMap::new(),
            found: 0,
            location_bytes: 0,
            over_budget: false,
        }
    }

    pub(crate) fn error_at(
        &mut self,
        path: &str,
        location: Option<Location>,
        message: impl Into<String>,
    ) {
        self.found += 1;
        if self.errors.len() >= MAX_ERRORS {
            return;
        }
        self.errors.push(ConfigError {
            origin: self.origin.to_owned(),
            path: path.to_owned(),
            location,
            message: message.into(),
        });
    }

    /// The value of a required field; reports `missing` at `path` (the enclosing mapping) when
    /// it is absent.
    pub(crate) fn required<T>(&mut self, field: Field<T>, path: &str, missing: &str) -> Option<T> {
        match field {
            Field::Value(value) => Some(value),
            Field::Absent => {
                self.error(path, missing);
                None
            }
            Field::Invalid => None,
        }
    }

    /// An error about the node at `path`, placed where that node stands.
    pub(crate) fn error(&mut self, path: &str, message: impl Into<String>) {
        let location = self.locations.get(path).copied();
        self.error_at(path, location, message);
    }

    /// Walks the whole tree once, before decoding, so that every node's position is known by
    /// path (also for errors found after loading), and reports what is wrong with the tree
    /// itself: duplicate and non-scalar keys.
    ///
    /// A collection or an empty value is placed at its key: `functions.resize` points at the
    /// line that says `resize:`, not at its first field.
    pub(crate) fn record_locations(&mut self, node: &Node, path: &str, key: Option<Location>) {
        if self.over_budget {
            return;
        }
        self.location_bytes = self
            .location_bytes
            .saturating_add(path.len() + LOCATION_OVERHEAD);
        if self.location_bytes > MAX_LOCATION_BYTES {
            self.over_budget = true;
            self.error_at(
                path,
                Some(node.location),
                format!(
                    "the file has too many nodes, or nodes nested too deep under long keys: their paths take more than {} MiB",
                    MAX_LOCATION_BYTES / (1024 * 1024)
                ),
            );
            return;
        }
        let own = match &node.kind {
            Kind::Scalar { text, .. } if !text.is_empty() => node.location,
            _ => key.unwrap_or(node.location),
        };
        self.locations.insert(path.to_owned(), own);
        match &node.kind {
            Kind::Scalar { .. } => {}
            Kind::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    // Checked before the child's path is built: each one repeats this path.
                    if self.over_budget {
                        return;
                    }
                    self.record_locations(item, &index(path, i), None);
                }
            }
            Kind::Mapping(entries) => {
                let mut first_seen: HashMap<&str, Location> = HashMap::new();
                for (key, value) in entries {
                    if self.over_budget {
                        return;
                    }
                    let Kind::Scalar { text, .. } = &key.kind else {
                        self.error_at(
                            path,
                            Some(key.location),
                            format!("a key must be a plain value, not {}", key.type_name()),
                        );
                        continue;
                    };
                    let key_path = child(path, text);
                    if let Some(first) = first_seen.get(text.as_str()) {
                        let message = format!(
                            "duplicate key `{text}` (first given on line {})",
                            first.line
                        );
                        self.error_at(&key_path, Some(key.location), message);
                        continue;
                    }
                    first_seen.insert(text, key.location);
                    self.record_locations(value, &key_path, Some(key.location));
                }
            }
        }
    }

    /// The entries of a mapping at `path`; a null value is an empty mapping. `allowed`, when
    /// given, is the full set of keys: any other is reported.
    pub(crate) fn mapping<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        allowed: Option<&[&str]>,
    ) -> Option<Fields<'n>> {
        let entries = match &node.kind {
            Kind::Mapping(entries) => unique_entries(entries),
            Kind::Scalar { .. } if node.is_null() => Vec::new(),
            _ => {
                self.error(
                    path,
                    format!("expected a mapping, found {}", node.type_name()),
                );
                return None;
            }
        };
        let fields = Fields {
            path: path.to_owned(),
            entries,
        };
        if let Some(allowed) = allowed {
            self.check_keys(&fields, allowed);
        }
        Some(fields)
    }

    pub(crate) fn check_keys(&mut self, fields: &Fields<'_>, allowed: &[&str]) {
        self.check_typed_keys(fields, allowed, &[], "");
    }

    /// Like [`Decoder::check_keys`] for a mapping with a `type`: a key in `known` (one that
    /// other types take) is reported as not applying to `this` (like "`sqs` sources") rather
    /// than as unknown.
    pub(crate) fn check_typed_keys(
        &mut self,
        fields: &Fields<'_>,
        allowed: &[&str],
        known: &[&str],
        this: &str,
    ) {
        for entry in &fields.entries {
            if allowed.contains(&entry.key) {
                continue;
            }
            let message = if known.contains(&entry.key) {
                format!("`{}` does not apply to {this}", entry.key)
            } else {
                let mut message = format!(
                    "unknown field `{}`, expected one of: {}",
                    entry.key,
                    allowed.join(", ")
                );
                if let Some(near) = closest(entry.key, allowed) {
                    message.push_str(&format!("; did you mean `{near}`?"));
                }
                message
            };
            self.error_at(
                &fields.path_of(entry.key),
                Some(entry.key_location),
                message,
            );
        }
    }

    /// A nested mapping field such as `api`; absent or null reads as empty.
    pub(crate) fn section<'n>(
        &mut self,
        fields: &Fields<'n>,
        key: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n>> {
        let path = fields.path_of(key);
        match fields.get(key) {
            Some(node) => self.mapping(node, &path, Some(allowed)),
            None => Some(Fields {
                path,
                entries: Vec::new(),
            }),
        }
    }

    /// The entries of a free-form mapping field (`functions`, `environment`, `tags`).
    pub(crate) fn entries<'n>(&mut self, fields: &Fields<'n>, key: &str) -> Vec<Entry<'n>> {
        let path = fields.path_of(key);
        fields
            .get(key)
            .and_then(|node| self.mapping(node, &path, None))
            .map(|fields| fields.entries)
            .unwrap_or_default()
    }

    /// The text of a scalar after `${VAR}` substitution, with whether it was plain (and so is
    /// typed by its text). A null, also one produced by substitution, is `Absent`.
    pub(crate) fn scalar(
        &mut self,
        node: &Node,
        path: &str,
        expected: &str,
    ) -> Field<(String, bool)> {
        let Kind::Scalar { text, plain } = &node.kind else {
            self.error(
                path,
                format!("expected {expected}, found {}", node.type_name()),
            );
            return Field::Invalid;
        };
        match interpolate(text, self.env) {
            Ok(text) if *plain && yaml::is_null_text(&text) => Field::Absent,
            Ok(text) => Field::Value((text, *plain)),
            Err(messages) => {
                for message in messages {
                    self.error(path, message);
                }
                Field::Invalid
            }
        }
    }

    /// A scalar's text handed to `parse`, whose error message is reported at the node.
    pub(crate) fn parse_node<T>(
        &mut self,
        node: &Node,
        path: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Field<T> {
        match self.scalar(node, path, expected) {
            Field::Value((text, _)) => match parse(&text) {
                Ok(value) => Field::Value(value),
                Err(message) => {
                    self.error(path, message);
                    Field::Invalid
                }
            },
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        }
    }

    pub(crate) fn parse<T>(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Field<T> {
        match fields.get(key) {
            Some(node) => self.parse_node(node, &fields.path_of(key), expected, parse),
            None => Field::Absent,
        }
    }

    /// A string node. Plain scalars that YAML reads as numbers or booleans are refused: quote
    /// them to mean the text.
    pub(crate) fn string_node(&mut self, node: &Node, path: &str) -> Field<String> {
        match self.scalar(node, path, "a string") {
            Field::Value((text, plain)) => match yaml::scalar_type(&text, plain) {
                "a string" => Field::Value(text),
                found => {
                    self.error(
                        path,
                        format!("expected a string, found {found} (`{text}`); quote it to use it as text"),
                    );
                    Field::Invalid
                }
            },
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        }
    }

    pub(crate) fn string(&mut self, fields: &Fields<'_>, key: &str) -> Field<String> {
        match fields.get(key) {
            Some(node) => self.string_node(node, &fields.path_of(key)),
            None => Field::Absent,
        }
    }

    /// Any scalar as text: numbers and booleans keep the spelling they have in the file.
    pub(crate) fn text_node(&mut self, node: &Node, path: &str, expected: &str) -> Field<String> {
        self.scalar(node, path, expected).map(|(text, _)| text)
    }

    pub(crate) fn int(
        &mut self,
        fields: &Fields<'_>,
        key: &str,
        range: RangeInclusive<i128>,
        range_note: &str,
    ) -> Field<i128> {
        let Some(node) = fields.get(key) else {
            return Field::Absent;
        };
        let path = fields.path_of(key);
        match self.scalar(node, &path, "an integer") {
            Field::Value((text, plain)) => {
                let value = if plain { yaml::int_value(&text) } else { None };
                match value {
                    Some(value) if range.contains(&value) => Field::Value(value),
                    Some(value) => {
                        self.error(
                            &path,
                            format!(
                                "must be between {} and {}{range_note}, got {value}",
                                range.start(),
                                range.end()
                            ),
                        );
                        Field::Invalid
                    }
                    None => {
                        let found = yaml::scalar_type(&text, plain);
                        self.error(
                            &path,
                            format!("expected an integer, found {found} (`{text}`)"),
                        );
                        Field::Invalid
                    }
                }
            }
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        }
    }

    pub(crate) fn boolean(&mut self, fields: &Fields<'_>, key: &str) -> Field<bool> {
        let Some(node) = fields.get(key) else {
            return Field::Absent;
        };
        let path = fields.path_of(key);
        match self.scalar(node, &path, "true or false") {
            Field::Value((text, plain)) => match yaml::bool_value(&text).filter(|_| plain) {
                Some(value) => Field::Value(value),
                None => {
                    let found = yaml::scalar_type(&text, plain);
                    self.error(
                        &path,
                        format!("expected true or false, found {found} (`{text}`)"),
                    );
                    Field::Invalid
                }
            },
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        }
    }
}

/// The candidate nearest to `word` by edit distance, when it is close enough (at most 2 edits)
/// to be a likely typo rather than a different word.
pub(crate) fn closest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    // A suggestion among thousands of names helps nobody, and would cost a distance per name
    // for every unknown reference.
    if candidates.len() > MAX_SUGGESTION_CANDIDATES {
        return None;
    }
    let length = word.chars().count();
    candidates
        .iter()
        // Two edits cannot bridge a larger difference in length; skipping those keeps a
        // megabyte-long key from costing a megabyte-sized table per candidate.
        .filter(|candidate| candidate.chars().count().abs_diff(length) <= 2)
        .map(|candidate| (edit_distance(word, candidate), *candidate))
        .filter(|(distance, candidate)| {
            *distance <= 2 && *distance < word.chars().count().max(candidate.chars().count())
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

const MAX_SUGGESTION_CANDIDATES: usize = 1000;

/// Levenshtein distance, counting an adjacent swap (`memroy`) as one edit like a typist would.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + substitution);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_swaps_as_one() {
        assert_eq!(edit_distance("memroy_mb", "memory_mb"), 1);
        assert_eq!(edit_distance("timeout", "timeout"), 0);
        assert_eq!(edit_distance("timout", "timeout"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn closest_suggests_only_likely_typos() {
        let keys = ["runtime", "package", "memory_mb", "timeout"];
        assert_eq!(closest("memroy_mb", &keys), Some("memory_mb"));
        assert_eq!(closest("timeot", &keys), Some("timeout"));
        assert_eq!(closest("packages", &keys), Some("package"));
        assert_eq!(closest("brokers", &keys), None);
        assert_eq!(closest("ab", &["xy"]), None);
    }
}
