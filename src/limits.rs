//! The size limits of a room, checked on every source file under `src/`
//! (its code before a `#[cfg(test)]` module): a file of at most
//! `FILE_LINES` lines, a function of at most `FN_LINES`, a struct of at most
//! `STRUCT_FIELDS` named fields. They keep a module's purpose one a reader
//! can hold; a file that outgrows them splits along its seams
//! (docs/design.md, "Where each part lives").

/// Lines of code before a file's tests.
const FILE_LINES: usize = 450;
/// Lines of a function, signature to closing brace.
const FN_LINES: usize = 60;
/// Named fields of a struct.
const STRUCT_FIELDS: usize = 16;
/// Structs that mirror a configuration section whose keys users write
/// flat: grouping them would need serde's `flatten`, which cannot refuse
/// unknown keys.
const WIDE_BY_DESIGN: &[&str] = &["ModelConfig"];

/// `text` with comments, string and char literals blanked (their lines
/// kept), so that braces and colons in them do not count.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == 'r' && (next == Some('#') || next == Some('"')) && !prev_is_ident(&chars, i) {
            let hashes = chars[i + 1..].iter().take_while(|&&h| h == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            i += 2 + hashes;
            while i < chars.len() && !(chars[i] == '"' && chars[i + 1..].iter().take(hashes).all(|&h| h == '#')) {
                out.extend((chars[i] == '\n').then_some('\n'));
                i += 1;
            }
            i += 1 + hashes;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                out.extend((chars[i] == '\n').then_some('\n'));
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' && (chars.get(i + 2) == Some(&'\'') || next == Some('\\')) {
            i += if next == Some('\\') {
                chars[i + 2..].iter().position(|&q| q == '\'').map_or(1, |p| p + 3)
            } else {
                3
            };
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_is_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// The lines before the file's test module.
fn before_tests(code: &str) -> Vec<&str> {
    let lines: Vec<&str> = code.lines().collect();
    let end = (0..lines.len())
        .find(|&i| lines[i].trim() == "#[cfg(test)]" && lines.get(i + 1).is_some_and(|l| l.contains("mod ")))
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// The name after `keyword ` on `line`, if the line declares one.
fn declared<'a>(line: &'a str, keyword: &str) -> Option<&'a str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == keyword)?;
    let modifiers = ["pub", "pub(crate)", "pub(super)", "async", "const", "unsafe", "extern"];
    words[..at].iter().all(|w| modifiers.contains(w) || w.starts_with("pub(")).then_some(())?;
    let name = words.get(at + 1)?;
    Some(name.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap_or(name))
}

/// Lines from `start` to the line that closes the brace opened there (or
/// `None` for a declaration without a body), and the named fields at its
/// first level.
fn item_extent(lines: &[&str], start: usize) -> Option<(usize, usize)> {
    let (mut depth, mut opened, mut fields) = (0i64, false, 0usize);
    for (i, line) in lines.iter().enumerate().skip(start) {
        if opened && depth == 1 && is_field(line) {
            fields += 1;
        }
        for c in line.chars() {
            match c {
                '{' => (depth, opened) = (depth + 1, true),
                '}' => depth -= 1,
                ';' if !opened && depth == 0 => return None,
                _ => {}
            }
        }
        if opened && depth <= 0 {
            return Some((i - start + 1, fields));
        }
    }
    None
}

fn is_field(line: &str) -> bool {
    let t = line.trim_start();
    let t = t
        .strip_prefix("pub(crate) ")
        .or_else(|| t.strip_prefix("pub(super) "))
        .or_else(|| t.strip_prefix("pub "))
        .unwrap_or(t);
    let name: String = t.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    !name.is_empty() && t[name.len()..].starts_with(':') && !t[name.len()..].starts_with("::")
}

/// What in `text` (a file called `file`) is over a limit, one line each.
fn over_limits(file: &str, text: &str) -> Vec<String> {
    let code = code_only(text);
    let lines = before_tests(&code);
    let mut over = Vec::new();
    if lines.len() > FILE_LINES {
        over.push(format!("{file}: {} lines (at most {FILE_LINES})", lines.len()));
    }
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = declared(line, "fn") {
            if let Some((n, _)) = item_extent(&lines, i).filter(|&(n, _)| n > FN_LINES) {
                over.push(format!("{file}:{}: fn {name} is {n} lines (at most {FN_LINES})", i + 1));
            }
        }
        if let Some(name) = declared(line, "struct").filter(|n| !WIDE_BY_DESIGN.contains(n)) {
            if let Some((_, n)) = item_extent(&lines, i).filter(|&(_, n)| n > STRUCT_FIELDS) {
                over.push(format!("{file}:{}: struct {name} has {n} fields (at most {STRUCT_FIELDS})", i + 1));
            }
        }
    }
    over
}

#[test]
fn every_room_in_src_is_within_its_limits() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut over = Vec::new();
    for path in crate::layers::rust_files(&src) {
        let text = std::fs::read_to_string(&path).expect("readable source");
        let name = path.strip_prefix(&src).unwrap_or(&path).display().to_string();
        over.extend(over_limits(&name, &text));
    }
    over.sort();
    assert!(over.is_empty(), "over the limits of a room:\n{}", over.join("\n"));
}

#[test]
fn the_limits_see_functions_structs_and_files_but_not_literals() {
    let long_fn = format!("fn long() {{\n{}}}\n", "    step();\n".repeat(FN_LINES));
    assert_eq!(over_limits("a.rs", &long_fn), ["a.rs:1: fn long is 62 lines (at most 60)"]);
    let wide = format!(
        "pub struct Wide {{\n{}}}\n",
        (0..=STRUCT_FIELDS).map(|i| format!("    pub f{i}: u8,\n")).collect::<String>()
    );
    assert_eq!(over_limits("b.rs", &wide), ["b.rs:1: struct Wide has 17 fields (at most 16)"]);
    let braces_in_literals = "fn f() {\n    let s = \"}}}\";\n    let c = '{';\n    // }\n}\nfn g() {}\n";
    assert!(over_limits("c.rs", braces_in_literals).is_empty());
    let tests_after = format!("fn f() {{}}\n#[cfg(test)]\nmod tests {{\n{}}}\n", "    x();\n".repeat(FILE_LINES));
    assert!(over_limits("d.rs", &tests_after).is_empty(), "tests do not count");
}
