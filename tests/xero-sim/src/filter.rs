//! The subset of Xero's `where` and `order` query syntax the simulator
//! understands, evaluated against a resource's JSON: comparisons
//! (`==`, `!=`, `<`, `<=`, `>`, `>=`) on dotted fields with string, number,
//! boolean, `Guid("...")` and `DateTime(y,m,d)` literals, the methods
//! `Contains`, `StartsWith`, `EndsWith`, `AND`/`&&`, `OR`/`||`, `NOT`/`!` and parentheses.

use chrono::NaiveDate;
use rust_decimal::Decimal;
use serde_json::Value;
use std::cmp::Ordering;

use crate::xjson::{as_decimal, parse_day};

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(String),
    Op(String),
    LParen,
    RParen,
    Comma,
    Dot,
}

fn lex(s: &str) -> Result<Vec<Tok>, String> {
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if ch == '"' || ch == '\'' {
            // Xero's `where` is .NET Dynamic LINQ: inside a literal the
            // delimiter is written twice (`"a ""b"" c"`) and a backslash is
            // an ordinary character, so `\"` ends the literal (Xero then
            // answers "Syntax error"); a single-quoted literal is one
            // character.
            let q = ch;
            i += 1;
            let mut v = String::new();
            loop {
                if i >= c.len() {
                    return Err("Unterminated string literal".into());
                }
                if c[i] == q {
                    if c.get(i + 1) == Some(&q) {
                        v.push(q);
                        i += 2;
                        continue;
                    }
                    i += 1;
                    break;
                }
                v.push(c[i]);
                i += 1;
            }
            if q == '\'' && v.chars().count() != 1 {
                return Err("Character literal must contain exactly one character".into());
            }
            out.push(Tok::Str(v));
        } else if ch.is_ascii_digit()
            || (ch == '-' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let start = i;
            i += 1;
            while i < c.len() && (c[i].is_ascii_digit() || c[i] == '.') {
                i += 1;
            }
            out.push(Tok::Num(c[start..i].iter().collect()));
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            if ["==", "!=", "<=", ">=", "&&", "||"].contains(&two.as_str()) {
                out.push(Tok::Op(two));
                i += 2;
                continue;
            }
            i += 1;
            out.push(match ch {
                '(' => Tok::LParen,
                ')' => Tok::RParen,
                ',' => Tok::Comma,
                '.' => Tok::Dot,
                '<' | '>' | '!' | '=' => Tok::Op(ch.to_string()),
                _ => return Err(format!("unexpected character '{ch}'")),
            });
        }
    }
    Ok(out)
}

/// A literal in a `where` clause.
#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Str(String),
    /// `Guid("...")`: compared as a GUID, whatever the letters' case.
    Guid(String),
    Num(Decimal),
    Bool(bool),
    Date(NaiveDate),
    Null,
}

/// A parsed `where` expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// Both hold.
    And(Box<Expr>, Box<Expr>),
    /// Either holds.
    Or(Box<Expr>, Box<Expr>),
    /// Negation.
    Not(Box<Expr>),
    /// `Field op literal`, the field's text cased as asked
    /// (`Field.ToLower() == "x"`).
    Cmp(Vec<String>, Case, String, LitPub),
    /// `Field.Method("x")` (`Field.ToLower().Contains("x")`).
    Method(Vec<String>, Case, String, String),
    /// A bare boolean field.
    Truthy(Vec<String>),
}

/// What a field's text goes through before it is compared: Xero compares
/// strings as they are (`Name=="acme"` does not find "Acme"); a clause
/// that wants otherwise says `Name.ToLower()=="acme"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// As stored.
    As,
    /// `.ToLower()`.
    Lower,
    /// `.ToUpper()`.
    Upper,
}

impl Case {
    fn apply(self, s: &str) -> std::borrow::Cow<'_, str> {
        match self {
            Case::As => std::borrow::Cow::Borrowed(s),
            Case::Lower => std::borrow::Cow::Owned(s.to_lowercase()),
            Case::Upper => std::borrow::Cow::Owned(s.to_uppercase()),
        }
    }
}

/// A literal (opaque outside this module).
#[derive(Debug, Clone, PartialEq)]
pub struct LitPub(Lit);

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
    /// How many `NOT`s and `(`s enclose the current position.
    depth: usize,
}

/// The most tokens a `where` clause may have, and the deepest it may nest
/// `NOT` and parentheses: the parser, the evaluator and dropping the tree
/// all recurse, so a clause of 200,000 `!`s would overflow the stack.
const MAX_TOKENS: usize = 2_000;
const MAX_DEPTH: usize = 64;

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn is_kw(&self, kw: &str, op: &str) -> bool {
        match self.peek() {
            Some(Tok::Ident(i)) => i.eq_ignore_ascii_case(kw),
            Some(Tok::Op(o)) => o == op,
            _ => false,
        }
    }
    fn or(&mut self) -> Result<Expr, String> {
        let mut l = self.and()?;
        while self.is_kw("OR", "||") {
            self.pos += 1;
            l = Expr::Or(Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, String> {
        let mut l = self.unary()?;
        while self.is_kw("AND", "&&") {
            self.pos += 1;
            l = Expr::And(Box::new(l), Box::new(self.unary()?));
        }
        Ok(l)
    }
    fn unary(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        let e = self.unary_inner();
        self.depth -= 1;
        e
    }
    fn unary_inner(&mut self) -> Result<Expr, String> {
        if self.depth > MAX_DEPTH {
            return Err(format!(
                "the clause nests NOT and parentheses deeper than {MAX_DEPTH}"
            ));
        }
        if self.is_kw("NOT", "!") {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let e = self.or()?;
            if self.next() != Some(Tok::RParen) {
                return Err("expected ')'".into());
            }
            return Ok(e);
        }
        self.comparison()
    }
    fn comparison(&mut self) -> Result<Expr, String> {
        let mut path = Vec::new();
        let mut case = Case::As;
        match self.next() {
            Some(Tok::Ident(i)) => path.push(i),
            other => return Err(format!("expected a field name, found {other:?}")),
        }
        loop {
            if self.peek() != Some(&Tok::Dot) {
                break;
            }
            self.pos += 1;
            let Some(Tok::Ident(i)) = self.next() else {
                return Err("expected a name after '.'".into());
            };
            if self.peek() == Some(&Tok::LParen) {
                // method call
                self.pos += 1;
                let arg = match self.next() {
                    Some(Tok::Str(s)) => s,
                    Some(Tok::RParen) if case == Case::As && i.eq_ignore_ascii_case("ToLower") => {
                        case = Case::Lower;
                        continue;
                    }
                    Some(Tok::RParen) if case == Case::As && i.eq_ignore_ascii_case("ToUpper") => {
                        case = Case::Upper;
                        continue;
                    }
                    Some(Tok::RParen) => {
                        return Err(format!("method {i} needs an argument"));
                    }
                    other => return Err(format!("bad method argument {other:?}")),
                };
                if self.next() != Some(Tok::RParen) {
                    return Err("expected ')'".into());
                }
                return Ok(Expr::Method(path, case, i, arg));
            }
            if case != Case::As {
                return Err(format!("no property {i} after a method call"));
            }
            path.push(i);
        }
        let op = match self.peek() {
            Some(Tok::Op(o)) if ["==", "!=", "<", "<=", ">", ">=", "="].contains(&o.as_str()) => {
                let o = if o == "=" {
                    "==".to_string()
                } else {
                    o.clone()
                };
                self.pos += 1;
                o
            }
            _ if case == Case::As => return Ok(Expr::Truthy(path)),
            other => return Err(format!("expected a comparison, found {other:?}")),
        };
        let lit = self.literal()?;
        Ok(Expr::Cmp(path, case, op, LitPub(lit)))
    }
    fn literal(&mut self) -> Result<Lit, String> {
        match self.next() {
            Some(Tok::Str(s)) => Ok(Lit::Str(s)),
            Some(Tok::Num(n)) => n
                .parse::<Decimal>()
                .map(Lit::Num)
                .map_err(|_| format!("bad number {n}")),
            Some(Tok::Ident(i)) if i.eq_ignore_ascii_case("true") => Ok(Lit::Bool(true)),
            Some(Tok::Ident(i)) if i.eq_ignore_ascii_case("false") => Ok(Lit::Bool(false)),
            Some(Tok::Ident(i)) if i.eq_ignore_ascii_case("null") => Ok(Lit::Null),
            Some(Tok::Ident(i)) if i.eq_ignore_ascii_case("Guid") => {
                self.expect(Tok::LParen)?;
                let Some(Tok::Str(s)) = self.next() else {
                    return Err("Guid() needs a string".into());
                };
                self.expect(Tok::RParen)?;
                Ok(Lit::Guid(s))
            }
            Some(Tok::Ident(i)) if i.eq_ignore_ascii_case("DateTime") => {
                self.expect(Tok::LParen)?;
                let mut parts = Vec::new();
                loop {
                    match self.next() {
                        Some(Tok::Num(n)) => {
                            parts.push(n.parse::<u32>().map_err(|e| e.to_string())?)
                        }
                        other => return Err(format!("bad DateTime argument {other:?}")),
                    }
                    match self.next() {
                        Some(Tok::Comma) => continue,
                        Some(Tok::RParen) => break,
                        other => return Err(format!("bad DateTime syntax {other:?}")),
                    }
                }
                if parts.len() < 3 {
                    return Err("DateTime needs year, month, day".into());
                }
                NaiveDate::from_ymd_opt(parts[0] as i32, parts[1], parts[2])
                    .map(Lit::Date)
                    .ok_or_else(|| "invalid date".to_string())
            }
            other => Err(format!("expected a value, found {other:?}")),
        }
    }
    fn expect(&mut self, t: Tok) -> Result<(), String> {
        if self.next() == Some(t.clone()) {
            Ok(())
        } else {
            Err(format!("expected {t:?}"))
        }
    }
}

/// Parse a `where` clause.
pub fn parse_where(s: &str) -> Result<Expr, String> {
    let toks = lex(s)?;
    if toks.is_empty() {
        return Err("empty where clause".into());
    }
    if toks.len() > MAX_TOKENS {
        return Err(format!(
            "the clause has {} terms; at most {MAX_TOKENS} are read",
            toks.len()
        ));
    }
    let mut p = Parser {
        toks,
        pos: 0,
        depth: 0,
    };
    let e = p.or()?;
    if p.pos < p.toks.len() {
        return Err(format!("unexpected {:?}", p.toks[p.pos]));
    }
    Ok(e)
}

fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for p in path {
        let obj = cur.as_object()?;
        cur = obj.get(p).or_else(|| {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(p))
                .map(|(_, v)| v)
        })?;
    }
    Some(cur)
}

fn compare(field: Option<&Value>, case: Case, lit: &Lit) -> Option<Ordering> {
    let field = field.unwrap_or(&Value::Null);
    match lit {
        Lit::Null => Some(if field.is_null() {
            Ordering::Equal
        } else {
            Ordering::Greater
        }),
        Lit::Bool(b) => field.as_bool().map(|f| f.cmp(b)),
        Lit::Num(n) => as_decimal(field).map(|f| f.cmp(n)),
        Lit::Date(d) => field.as_str().and_then(parse_day).map(|f| f.cmp(d)),
        Lit::Guid(g) => field
            .as_str()
            .map(|f| f.to_ascii_lowercase().cmp(&g.to_ascii_lowercase())),
        Lit::Str(s) => match field {
            Value::String(f) => Some(case.apply(f).as_ref().cmp(s.as_str())),
            Value::Number(_) => {
                let f = as_decimal(field)?;
                s.parse::<Decimal>().ok().map(|n| f.cmp(&n))
            }
            Value::Bool(b) => Some(b.to_string().cmp(&s.to_lowercase())),
            _ => None,
        },
    }
}

/// The string `field` must equal (compared case-insensitively here, a
/// superset of what [`eval`] finds) for `e` to hold, when `e` is a conjunction with a
/// `field == "literal"` term at its top level. Lets a list endpoint skip
/// rendering resources that cannot match; [`eval`] still decides.
pub fn required_equal(e: &Expr, field: &str) -> Option<String> {
    match e {
        Expr::And(a, b) => required_equal(a, field).or_else(|| required_equal(b, field)),
        Expr::Cmp(path, Case::As, op, LitPub(Lit::Str(s)))
            if op == "==" && path.len() == 1 && path[0].eq_ignore_ascii_case(field) =>
        {
            Some(s.to_lowercase())
        }
        _ => None,
    }
}

/// Whether a resource's JSON satisfies the expression.
pub fn eval(e: &Expr, v: &Value) -> bool {
    match e {
        Expr::And(a, b) => eval(a, v) && eval(b, v),
        Expr::Or(a, b) => eval(a, v) || eval(b, v),
        Expr::Not(a) => !eval(a, v),
        Expr::Truthy(p) => lookup(v, p).and_then(Value::as_bool).unwrap_or(false),
        Expr::Method(p, case, m, arg) => {
            let f = lookup(v, p).and_then(Value::as_str).unwrap_or("");
            let f = case.apply(f);
            let a = arg.as_str();
            match m.to_ascii_lowercase().as_str() {
                "contains" => f.contains(a),
                "startswith" => f.starts_with(a),
                "endswith" => f.ends_with(a),
                _ => false,
            }
        }
        Expr::Cmp(p, case, op, LitPub(lit)) => {
            let o = compare(lookup(v, p), *case, lit);
            match (op.as_str(), o) {
                ("==", Some(o)) => o == Ordering::Equal,
                ("!=", Some(o)) => o != Ordering::Equal,
                ("!=", None) => true,
                ("<", Some(o)) => o == Ordering::Less,
                ("<=", Some(o)) => o != Ordering::Greater,
                (">", Some(o)) => o == Ordering::Greater,
                (">=", Some(o)) => o != Ordering::Less,
                _ => false,
            }
        }
    }
}

/// Sort resources by an `order` parameter like `Name ASC, Code DESC`.
pub fn sort_by_order(items: &mut [Value], order: &str) {
    let keys: Vec<(Vec<String>, bool)> = order
        .split(',')
        .filter_map(|part| {
            let mut it = part.split_whitespace();
            let field = it.next()?;
            let desc = it.next().is_some_and(|d| d.eq_ignore_ascii_case("DESC"));
            Some((field.split('.').map(String::from).collect(), desc))
        })
        .collect();
    items.sort_by(|a, b| {
        for (path, desc) in &keys {
            let o = cmp_values(lookup(a, path), lookup(b, path));
            let o = if *desc { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
}

/// What a value sorts by: missing first, then null, booleans, numbers,
/// Xero dates, and other strings ignoring case. One rank per kind of value
/// keeps the order total (`sort_by` may panic on one that is not).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum SortKey {
    Missing,
    Null,
    Bool(bool),
    Number(Option<Decimal>),
    Date(NaiveDate),
    Text(String),
    Other,
}

fn sort_key(v: Option<&Value>) -> SortKey {
    match v {
        None => SortKey::Missing,
        Some(Value::Null) => SortKey::Null,
        Some(Value::Bool(b)) => SortKey::Bool(*b),
        Some(n @ Value::Number(_)) => SortKey::Number(as_decimal(n)),
        Some(Value::String(s)) => match parse_day(s).filter(|_| s.starts_with("/Date")) {
            Some(d) => SortKey::Date(d),
            None => SortKey::Text(s.to_lowercase()),
        },
        Some(_) => SortKey::Other,
    }
}

fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    sort_key(a).cmp(&sort_key(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pinned_number_is_found_only_in_a_top_level_conjunction() {
        let e = parse_where(
            r#"Type=="ACCPAY" AND InvoiceNumber=="INV-7" AND Contact.ContactID==guid("x")"#,
        )
        .unwrap();
        assert_eq!(
            required_equal(&e, "InvoiceNumber").as_deref(),
            Some("inv-7")
        );
        assert_eq!(required_equal(&e, "CreditNoteNumber"), None);
        let or = parse_where(r#"InvoiceNumber=="A" OR InvoiceNumber=="B""#).unwrap();
        assert_eq!(required_equal(&or, "InvoiceNumber"), None);
        let ne = parse_where(r#"InvoiceNumber!="A""#).unwrap();
        assert_eq!(required_equal(&ne, "InvoiceNumber"), None);
    }

    #[test]
    fn where_clauses() {
        let v = json!({"Status":"ACTIVE","Type":"EXPENSE","Code":"400","Total":10.5,
            "Contact":{"ContactID":"AbC"},"Date":"/Date(1795564800000+0000)/","IsSupplier":true});
        let t = |s: &str| eval(&parse_where(s).unwrap(), &v);
        assert!(t(r#"Status=="ACTIVE""#));
        assert!(t(r#"Status=="ACTIVE" AND Type=="EXPENSE""#));
        assert!(!t(r#"Status=="ACTIVE" && Type=="REVENUE""#));
        assert!(t(r#"Type=="REVENUE" || Code=="400""#));
        assert!(t(r#"Contact.ContactID==Guid("abc")"#));
        assert!(t("Total>10"));
        assert!(t("Date>=DateTime(2026,11,25)"));
        assert!(t("IsSupplier"));
        assert!(t(r#"Code.StartsWith("4")"#));
        assert!(t(r#"NOT (Status=="ARCHIVED")"#));
        assert!(parse_where("Status==").is_err());
        assert!(parse_where(r#"Status=="x"#).is_err());
        assert!(parse_where("(((").is_err());
    }

    /// Strings compare as they are, as in Xero (`Name=="acme"` does not find
    /// "Acme"); `ToLower()`/`ToUpper()` ask otherwise; a GUID is a GUID
    /// whatever its letters' case.
    #[test]
    fn strings_compare_exactly_unless_cased() {
        let v = json!({"Name":"Globe EOR Ltd","Contact":{"ContactID":"AbC"}});
        let t = |s: &str| eval(&parse_where(s).unwrap(), &v);
        assert!(t(r#"Name=="Globe EOR Ltd""#));
        assert!(!t(r#"Name=="GLOBE EOR LTD""#));
        assert!(t(r#"Name.ToLower()=="globe eor ltd""#));
        assert!(t(r#"Name.ToUpper()=="GLOBE EOR LTD""#));
        assert!(!t(r#"Name.ToLower()=="Globe EOR Ltd""#));
        assert!(!t(r#"Name.Contains("eor")"#));
        assert!(t(r#"Name.ToLower().Contains("eor")"#));
        assert!(t(r#"Contact.ContactID==Guid("ABC")"#));
        assert!(!t(r#"Contact.ContactID=="ABC""#));
        assert!(parse_where("Name.ToLower()").is_err());
        assert!(parse_where(r#"Name.ToLower().Length=="x""#).is_err());
    }

    /// Literals as Dynamic LINQ reads them: a doubled quote is a quote, a
    /// backslash is itself, and `\"` ends the literal (so what follows is
    /// a syntax error, as Xero answers).
    #[test]
    fn string_literals_double_their_quotes() {
        let v = json!({"Name":"Globe \"EOR\" Ltd","Path":"a\\b"});
        let t = |s: &str| eval(&parse_where(s).unwrap(), &v);
        assert!(t(r#"Name=="Globe ""EOR"" Ltd""#));
        assert!(t(r#"Path=="a\b""#));
        assert!(!t(r#"Path=="a\\b""#));
        assert!(parse_where(r#"Name=="Globe \"EOR\" Ltd""#).is_err());
        assert!(parse_where(r#"Name=="Globe"#).is_err());
        assert!(parse_where("Name=='ab'").is_err());
    }

    #[test]
    fn ordering() {
        let mut items = vec![
            json!({"Code":"b"}),
            json!({"Code":"a"}),
            json!({"Code":"c"}),
        ];
        sort_by_order(&mut items, "Code DESC");
        assert_eq!(items[0]["Code"], "c");
    }

    #[test]
    fn a_clause_nested_past_the_limit_is_refused_not_a_stack_overflow() {
        let deep = format!("{}Name==\"x\"", "!".repeat(200_000));
        assert!(parse_where(&deep).unwrap_err().contains("at most"));
        let deep = format!("{}Name==\"x\"", "!".repeat(100));
        assert!(parse_where(&deep).unwrap_err().contains("deeper than"));
        let parens = format!("{}Name==\"x\"{}", "(".repeat(100), ")".repeat(100));
        assert!(parse_where(&parens).unwrap_err().contains("deeper than"));
        let long = vec!["Name==\"x\""; 1_000].join(" AND ");
        assert!(parse_where(&long).unwrap_err().contains("at most"));
        // Within the limits, still parsed.
        let ok = format!("{}Name==\"x\"{}", "(".repeat(30), ")".repeat(30));
        assert!(parse_where(&ok).is_ok());
        assert!(eval(
            &parse_where(&format!("{}Name==\"x\"", "NOT NOT ".repeat(20))).unwrap(),
            &json!({"Name": "x"})
        ));
    }

    #[test]
    fn ordering_mixed_values_is_a_total_order() {
        // Dates, text that is not a date, numbers, booleans, nulls and
        // missing fields, many of each: sort_by panics on an order that
        // is not total once it notices, so this sorts them repeatedly.
        let mut items: Vec<Value> = Vec::new();
        for i in 0..40 {
            items.push(match i % 7 {
                0 => json!({"Name": format!("/Date({}00000+0000)/", 99999 - i)}),
                1 => json!({"Name": format!("2000-01-0{} {i}", i % 9 + 1)}),
                2 => json!({"Name": i}),
                3 => json!({"Name": format!("b{i}")}),
                4 => json!({"Name": i % 2 == 0}),
                5 => json!({"Name": null}),
                _ => json!({}),
            });
        }
        for order in ["Name", "Name DESC"] {
            let mut sorted = items.clone();
            sort_by_order(&mut sorted, order);
            for w in sorted.windows(2) {
                let o = cmp_values(w[0].get("Name"), w[1].get("Name"));
                let want = if order == "Name" {
                    Ordering::Greater
                } else {
                    Ordering::Less
                };
                assert_ne!(o, want, "{order}: {} before {}", w[0], w[1]);
            }
        }
        assert_eq!(
            cmp_values(
                Some(&json!("/Date(99999999999999)/")),
                Some(&json!("2000-01-01 1"))
            ),
            cmp_values(
                Some(&json!("2000-01-01 1")),
                Some(&json!("/Date(99999999999999)/"))
            )
            .reverse()
        );
    }
}
