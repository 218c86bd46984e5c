//! DynamoDB expressions and item attributes, spelled once.
//!
//! Every attribute name goes through a `#name` placeholder (DynamoDB reserves `status`,
//! `total`, `name` and hundreds more), every value through a `:vN` placeholder, and only
//! placeholders an expression uses are sent (DynamoDB refuses unused ones).

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

use aws_sdk_dynamodb::types::{AttributeValue, Update};

use crate::store::{StoreError, StoreResult};

pub type Item = HashMap<String, AttributeValue>;

pub fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub fn n(v: impl Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub fn get_s<'a>(item: &'a Item, attr: &str) -> Option<&'a str> {
    match item.get(attr) {
        Some(AttributeValue::S(v)) => Some(v.as_str()),
        _ => None,
    }
}

pub fn get_n<T: FromStr>(item: &Item, attr: &str) -> Option<T> {
    match item.get(attr) {
        Some(AttributeValue::N(v)) => v.parse().ok(),
        _ => None,
    }
}

/// A number attribute every item of its kind has.
pub fn need_n<T: FromStr>(item: &Item, attr: &str) -> StoreResult<T> {
    get_n(item, attr)
        .ok_or_else(|| StoreError::Other(format!("stored item lacks number attribute {attr}")))
}

pub fn need_s<'a>(item: &'a Item, attr: &str) -> StoreResult<&'a str> {
    get_s(item, attr)
        .ok_or_else(|| StoreError::Other(format!("stored item lacks string attribute {attr}")))
}

/// The placeholders of one request.
#[derive(Default)]
pub struct Ex {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Ex {
    /// The placeholder of an attribute name (names here are `[a-z0-9_]`).
    pub fn n(&mut self, attr: &str) -> String {
        let key = format!("#{attr}");
        self.names.insert(key.clone(), attr.to_string());
        key
    }

    /// The placeholder of a value.
    pub fn v(&mut self, value: AttributeValue) -> String {
        let key = format!(":v{}", self.values.len());
        self.values.insert(key.clone(), value);
        key
    }

    pub fn names(&self) -> Option<HashMap<String, String>> {
        (!self.names.is_empty()).then(|| self.names.clone())
    }

    pub fn values(&self) -> Option<HashMap<String, AttributeValue>> {
        (!self.values.is_empty()).then(|| self.values.clone())
    }
}

/// One item's update: its SET, ADD and REMOVE clauses and the conditions it is made under.
#[derive(Default)]
pub struct Change {
    pub ex: Ex,
    set: Vec<String>,
    add: Vec<String>,
    remove: Vec<String>,
    delete: Vec<String>,
    conditions: Vec<String>,
}

impl Change {
    pub fn new() -> Self {
        Change::default()
    }

    pub fn set(mut self, attr: &str, value: AttributeValue) -> Self {
        let clause = format!("{} = {}", self.ex.n(attr), self.ex.v(value));
        self.set.push(clause);
        self
    }

    /// `SET attr = attr + delta`, for an attribute every item of its kind has.
    pub fn incr(mut self, attr: &str, delta: i64) -> Self {
        let name = self.ex.n(attr);
        let clause = format!("{name} = {name} + {}", self.ex.v(n(delta)));
        self.set.push(clause);
        self
    }

    /// `ADD attr delta`: creates the attribute at `delta` when missing.
    pub fn add(mut self, attr: &str, delta: i64) -> Self {
        let clause = format!("{} {}", self.ex.n(attr), self.ex.v(n(delta)));
        self.add.push(clause);
        self
    }

    /// `ADD attr :strings`: they join the string set (made when missing).
    pub fn add_strings(mut self, attr: &str, values: Vec<String>) -> Self {
        let clause = format!(
            "{} {}",
            self.ex.n(attr),
            self.ex.v(AttributeValue::Ss(values))
        );
        self.add.push(clause);
        self
    }

    /// `DELETE attr :strings`: they leave the string set.
    pub fn delete_strings(mut self, attr: &str, values: Vec<String>) -> Self {
        let clause = format!(
            "{} {}",
            self.ex.n(attr),
            self.ex.v(AttributeValue::Ss(values))
        );
        self.delete.push(clause);
        self
    }

    pub fn remove(mut self, attr: &str) -> Self {
        let name = self.ex.n(attr);
        self.remove.push(name);
        self
    }

    /// Adds a condition (all of them must hold), written with this change's placeholders.
    pub fn when(mut self, condition: impl FnOnce(&mut Ex) -> String) -> Self {
        let c = condition(&mut self.ex);
        self.conditions.push(c);
        self
    }

    pub fn update_expression(&self) -> String {
        let mut parts = Vec::new();
        if !self.set.is_empty() {
            parts.push(format!("SET {}", self.set.join(", ")));
        }
        if !self.add.is_empty() {
            parts.push(format!("ADD {}", self.add.join(", ")));
        }
        if !self.remove.is_empty() {
            parts.push(format!("REMOVE {}", self.remove.join(", ")));
        }
        if !self.delete.is_empty() {
            parts.push(format!("DELETE {}", self.delete.join(", ")));
        }
        parts.join(" ")
    }

    pub fn condition(&self) -> Option<String> {
        (!self.conditions.is_empty()).then(|| {
            self.conditions
                .iter()
                .map(|c| format!("({c})"))
                .collect::<Vec<_>>()
                .join(" AND ")
        })
    }

    /// This change as one action of a transaction.
    pub fn into_update(self, table: &str, key: Item) -> StoreResult<Update> {
        Update::builder()
            .table_name(table)
            .set_key(Some(key))
            .update_expression(self.update_expression())
            .set_condition_expression(self.condition())
            .set_expression_attribute_names(self.ex.names())
            .set_expression_attribute_values(self.ex.values())
            .build()
            .map_err(|e| StoreError::Other(format!("cannot build an update: {e}")))
    }
}

/// `#attr IN (:a, :b, ...)`.
pub fn is_in(ex: &mut Ex, attr: &str, values: &[&str]) -> String {
    let name = ex.n(attr);
    let list: Vec<String> = values.iter().map(|v| ex.v(s(*v))).collect();
    format!("{name} IN ({})", list.join(", "))
}

/// `#attr = :value`.
pub fn eq(ex: &mut Ex, attr: &str, value: AttributeValue) -> String {
    format!("{} = {}", ex.n(attr), ex.v(value))
}
