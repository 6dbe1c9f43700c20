//! From byte offsets to line, column and field path, using the spans the
//! TOML parser keeps for every key and value.

use std::ops::Range;

use toml::de::{DeTable, DeValue};

/// 1-based line and column (in characters) of `offset` in `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The dotted path of the innermost key whose key or value covers
/// `offset` (`true`), or else of the last key before it (`false`: a syntax
/// error often sits just past the value it broke).
///
/// The whole tree is searched: a `[table]` header's value spans only the
/// header line, while its keys sit on the lines below.
pub fn path_at(table: &DeTable<'_>, offset: usize) -> (String, bool) {
    #[derive(Default)]
    struct Found {
        covering: Vec<String>,
        preceding: Option<(usize, Vec<String>)>,
    }
    fn search(table: &DeTable<'_>, offset: usize, path: &mut Vec<String>, found: &mut Found) {
        for (key, value) in table.iter() {
            path.push(key.get_ref().to_string());
            let covers = contains(&key.span(), offset) || contains(&value.span(), offset);
            if covers && path.len() > found.covering.len() {
                found.covering = path.clone();
            }
            let start = key.span().start;
            if start <= offset && found.preceding.as_ref().is_none_or(|(s, _)| *s <= start) {
                found.preceding = Some((start, path.clone()));
            }
            if let DeValue::Table(inner) = value.get_ref() {
                search(inner, offset, path, found);
            }
            path.pop();
        }
    }
    let mut found = Found::default();
    search(table, offset, &mut Vec::new(), &mut found);
    if found.covering.is_empty() {
        let preceding = found.preceding.map(|(_, p)| p).unwrap_or_default();
        (preceding.join("."), false)
    } else {
        (found.covering.join("."), true)
    }
}

/// The span of the key at `path`, or of its nearest ancestor that exists
/// (a field left at its default has no place of its own).
pub fn span_of(table: &DeTable<'_>, path: &[&str]) -> Option<Range<usize>> {
    let mut current = table;
    let mut best = None;
    for segment in path {
        let Some((key, value)) = current.iter().find(|(k, _)| k.get_ref() == segment) else {
            break;
        };
        best = Some(key.span());
        match value.get_ref() {
            DeValue::Table(inner) => current = inner,
            _ => break,
        }
    }
    best
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, text.find('=').unwrap()), (1, 3));
        let second_eq = text.rfind('=').unwrap();
        assert_eq!(line_column(text, second_eq), (2, 4));
    }

    #[test]
    fn paths_and_spans_follow_nested_tables() {
        let text = "[plugins.echo]\ncommand = \"x\"\n[plugins.echo.health]\ntimeout = \"1s\"\n";
        let doc = DeTable::parse(text).unwrap();
        let offset = text.find("\"1s\"").unwrap();
        assert_eq!(
            path_at(doc.get_ref(), offset),
            ("plugins.echo.health.timeout".to_owned(), true)
        );
        // Past the end of the file, the last key is the nearest one.
        assert_eq!(
            path_at(doc.get_ref(), text.len()),
            ("plugins.echo.health.timeout".to_owned(), false)
        );
        let span = span_of(doc.get_ref(), &["plugins", "echo", "health", "timeout"]).unwrap();
        assert_eq!(&text[span], "timeout");
        let fallback = span_of(doc.get_ref(), &["plugins", "echo", "replicas"]).unwrap();
        assert_eq!(line_column(text, fallback.start).0, 1);
    }
}
