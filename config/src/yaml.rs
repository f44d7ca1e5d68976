//! A YAML node tree that remembers where every node stood.
//!
//! Built from `saphyr-parser` events rather than a DOM loader because the loaders keep the last
//! of two equal keys silently, and a duplicated key in a config file is a mistake to report.

use std::collections::HashMap;

use saphyr_parser::{Event, Marker, Parser, ScalarStyle, ScanError, Span};

use crate::Location;

/// Deeper than any sane config; a runaway file gets an error instead of overflowing the stack.
const MAX_DEPTH: usize = 128;

/// How much aliases may copy in all, counted as [`cost`]: roughly the memory the copies take.
/// Each alias copies its anchored node, so nested aliases grow exponentially ("billion laughs":
/// a 547-byte file that expands to gigabytes); a real config repeats a few small blocks.
pub(crate) const MAX_ALIAS_EXPANSION: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    pub(crate) location: Location,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// `plain` is false for quoted and block scalars and for `!!str`: those are strings
    /// whatever they look like, while a plain scalar is typed by its text (`30` is a number).
    Scalar {
        text: String,
        plain: bool,
    },
    Sequence(Vec<Node>),
    Mapping(Vec<(Node, Node)>),
}

impl Node {
    /// A plain empty, `~` or `null` scalar: YAML's null.
    pub(crate) fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, plain: true } if is_null_text(text))
    }

    pub(crate) fn type_name(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { text, plain } => scalar_type(text, *plain),
            Kind::Sequence(_) => "a list",
            Kind::Mapping(_) => "a mapping",
        }
    }
}

pub(crate) fn is_null_text(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

pub(crate) fn bool_value(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// YAML 1.2 core-schema integers: decimal with an optional sign, `0x…` and `0o…`.
pub(crate) fn int_value(text: &str) -> Option<i128> {
    if let Some(hex) = text.strip_prefix("0x") {
        return i128::from_str_radix(hex, 16).ok();
    }
    if let Some(octal) = text.strip_prefix("0o") {
        return i128::from_str_radix(octal, 8).ok();
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// YAML 1.2 core-schema floats, including `.inf` and `.nan`.
pub(crate) fn float_value(text: &str) -> Option<f64> {
    match text {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let starts_well = body.starts_with(|c: char| c.is_ascii_digit())
        || (body.starts_with('.') && body[1..].starts_with(|c: char| c.is_ascii_digit()));
    let only_number_chars = body
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'));
    if !starts_well || !only_number_chars {
        return None;
    }
    text.parse().ok()
}

/// How a scalar reads in an error message ("expected an integer, found a string").
pub(crate) fn scalar_type(text: &str, plain: bool) -> &'static str {
    if !plain {
        "a string"
    } else if is_null_text(text) {
        "nothing"
    } else if bool_value(text).is_some() {
        "a boolean"
    } else if int_value(text).is_some() {
        "an integer"
    } else if float_value(text).is_some() {
        "a number"
    } else {
        "a string"
    }
}

/// A syntax problem: the file could not be read as YAML at all.
#[derive(Debug)]
pub(crate) struct SyntaxError {
    pub(crate) location: Location,
    pub(crate) message: String,
}

impl From<ScanError> for SyntaxError {
    fn from(error: ScanError) -> Self {
        SyntaxError {
            location: location(*error.marker()),
            message: error.info().to_owned(),
        }
    }
}

pub(crate) fn location(marker: Marker) -> Location {
    // saphyr counts lines from 1 and columns from 0; editors count both from 1.
    Location {
        line: marker.line(),
        column: marker.col() + 1,
    }
}

/// Parses the single document in `text`; `None` for a file with no document (empty, or only
/// comments).
pub(crate) fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        expanded: 0,
    };
    builder.document()
}

/// A node with what it costs to copy it and how many levels deep it goes (a scalar is 1).
struct Built {
    node: Node,
    cost: usize,
    height: usize,
}

/// What a node counts against [`MAX_ALIAS_EXPANSION`] for itself (its children count apart).
fn cost(text_len: usize) -> usize {
    std::mem::size_of::<Node>().saturating_add(text_len)
}

struct Builder<'input> {
    parser: Parser<'input, saphyr_parser::StrInput<'input>>,
    /// Anchored nodes by saphyr's anchor id, with their cost and height, so that an alias is
    /// charged and depth-checked without walking the copy.
    anchors: HashMap<usize, Built>,
    /// What aliases have copied so far, against [`MAX_ALIAS_EXPANSION`].
    expanded: usize,
}

impl<'input> Builder<'input> {
    fn next(&mut self) -> Result<(Event<'input>, Span), SyntaxError> {
        match self.parser.next_event() {
            Some(result) => Ok(result?),
            None => Err(SyntaxError {
                location: Location { line: 1, column: 1 },
                message: "unexpected end of input".to_owned(),
            }),
        }
    }

    fn document(&mut self) -> Result<Option<Node>, SyntaxError> {
        let mut root = None;
        loop {
            let (event, span) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => return Ok(root),
                Event::DocumentStart(_) => {
                    if root.is_some() {
                        return Err(SyntaxError {
                            location: location(span.start),
                            message: "a config file holds one YAML document; found a second `---`"
                                .to_owned(),
                        });
                    }
                    let (event, span) = self.next()?;
                    root = Some(self.node(event, span, 0)?.node);
                }
                other => {
                    return Err(SyntaxError {
                        location: location(span.start),
                        message: format!("unexpected YAML event {other:?}"),
                    });
                }
            }
        }
    }

    fn node(
        &mut self,
        event: Event<'input>,
        span: Span,
        depth: usize,
    ) -> Result<Built, SyntaxError> {
        let at = location(span.start);
        if depth > MAX_DEPTH {
            return Err(too_deep(at));
        }
        let (built, anchor) = match event {
            Event::Scalar(text, style, anchor, tag) => {
                let forced_string = tag.is_some_and(|tag| tag.suffix == "str");
                let plain = style == ScalarStyle::Plain && !forced_string;
                let built = Built {
                    cost: cost(text.len()),
                    height: 1,
                    node: Node {
                        kind: Kind::Scalar {
                            text: text.into_owned(),
                            plain,
                        },
                        location: at,
                    },
                };
                (built, anchor)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                let (mut total, mut height) = (cost(0), 1);
                loop {
                    let (event, span) = self.next()?;
                    if event == Event::SequenceEnd {
                        break;
                    }
                    let item = self.node(event, span, depth + 1)?;
                    total = total.saturating_add(item.cost);
                    height = height.max(item.height + 1);
                    items.push(item.node);
                }
                let built = Built {
                    node: Node {
                        kind: Kind::Sequence(items),
                        location: at,
                    },
                    cost: total,
                    height,
                };
                (built, anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries = Vec::new();
                let (mut total, mut height) = (cost(0), 1);
                loop {
                    let (event, span) = self.next()?;
                    if event == Event::MappingEnd {
                        break;
                    }
                    let key = self.node(event, span, depth + 1)?;
                    let (event, span) = self.next()?;
                    let value = self.node(event, span, depth + 1)?;
                    total = total.saturating_add(key.cost).saturating_add(value.cost);
                    height = height.max(key.height.max(value.height) + 1);
                    entries.push((key.node, value.node));
                }
                let built = Built {
                    node: Node {
                        kind: Kind::Mapping(entries),
                        location: at,
                    },
                    cost: total,
                    height,
                };
                (built, anchor)
            }
            Event::Alias(anchor) => return self.alias(anchor, at, depth),
            other => {
                return Err(SyntaxError {
                    location: at,
                    message: format!("unexpected YAML event {other:?}"),
                });
            }
        };
        if anchor != 0 {
            let copy = Built {
                node: built.node.clone(),
                ..built
            };
            self.anchors.insert(anchor, copy);
        }
        Ok(built)
    }

    /// A copy of the anchored node, charged against the expansion budget before it is made
    /// and refused if it would nest the document too deep.
    fn alias(&mut self, anchor: usize, at: Location, depth: usize) -> Result<Built, SyntaxError> {
        let Some(anchored) = self.anchors.get(&anchor) else {
            return Err(SyntaxError {
                location: at,
                message: "alias to an unknown anchor".to_owned(),
            });
        };
        if depth + anchored.height - 1 > MAX_DEPTH {
            return Err(too_deep(at));
        }
        self.expanded = self.expanded.saturating_add(anchored.cost);
        if self.expanded > MAX_ALIAS_EXPANSION {
            return Err(SyntaxError {
                location: at,
                message: format!(
                    "aliases copy more than {} MiB of the document here; refused, as nested aliases grow a file exponentially (a \"billion laughs\")",
                    MAX_ALIAS_EXPANSION / (1024 * 1024)
                ),
            });
        }
        Ok(Built {
            node: Node {
                location: at,
                ..anchored.node.clone()
            },
            cost: anchored.cost,
            height: anchored.height,
        })
    }
}

fn too_deep(at: Location) -> SyntaxError {
    SyntaxError {
        location: at,
        message: format!("nested more than {MAX_DEPTH} levels deep"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        parse(text).unwrap().unwrap()
    }

    fn entries(node: &Node) -> &[(Node, Node)] {
        match &node.kind {
            Kind::Mapping(entries) => entries,
            other => panic!("not a mapping: {other:?}"),
        }
    }

    #[test]
    fn nodes_know_their_line_and_column() {
        let node = root("a: 1\nb:\n  c: \"x\"\n");
        let top = entries(&node);
        assert_eq!(top[0].0.location, Location { line: 1, column: 1 });
        assert_eq!(top[0].1.location, Location { line: 1, column: 4 });
        let inner = entries(&top[1].1);
        assert_eq!(inner[0].0.location, Location { line: 3, column: 3 });
        assert_eq!(inner[0].1.location, Location { line: 3, column: 6 });
    }

    #[test]
    fn quoting_decides_whether_a_scalar_is_typed() {
        let node = root("a: 30\nb: '30'\nc: !!str 30\nd: |\n  30\n");
        let plain: Vec<bool> = entries(&node)
            .iter()
            .map(|(_, value)| matches!(value.kind, Kind::Scalar { plain: true, .. }))
            .collect();
        assert_eq!(plain, [true, false, false, false]);
    }

    #[test]
    fn duplicate_keys_are_kept_for_the_decoder_to_report() {
        assert_eq!(entries(&root("a: 1\na: 2\n")).len(), 2);
    }

    #[test]
    fn aliases_copy_the_anchored_node() {
        let node = root("base: &b {x: 1}\nother: *b\n");
        let top = entries(&node);
        assert_eq!(entries(&top[1].1).len(), 1);
        assert_eq!(top[1].1.location.line, 2);
    }

    #[test]
    fn empty_and_comment_only_files_have_no_document() {
        assert!(parse("").unwrap().is_none());
        assert!(parse("# nothing here\n").unwrap().is_none());
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let error = parse("a: 1\n b: 2\n").unwrap_err();
        assert_eq!(error.location.line, 2);
        assert!(parse("a: [1, 2\n").is_err());
        assert!(
            parse("a: 1\n---\nb: 2\n")
                .unwrap_err()
                .message
                .contains("one YAML document")
        );
    }

    #[test]
    fn core_schema_scalars_are_recognised() {
        assert_eq!(scalar_type("128", true), "an integer");
        assert_eq!(scalar_type("0x10", true), "an integer");
        assert_eq!(scalar_type("1.5", true), "a number");
        assert_eq!(scalar_type("1e3", true), "a number");
        assert_eq!(scalar_type("true", true), "a boolean");
        assert_eq!(scalar_type("~", true), "nothing");
        assert_eq!(scalar_type("30s", true), "a string");
        assert_eq!(scalar_type("128", false), "a string");
        assert_eq!(int_value("-12"), Some(-12));
        assert_eq!(int_value("1_000"), None);
    }
}
