//! Integration tests: the real server on port 0 with a fresh database, against local
//! endpoints and callback receivers. One binary, so the build links once.

mod callbacks;
mod cli;
mod client;
mod crash;
mod dashboard;
mod helpers;
mod hosts;
mod lifecycle;
mod observe;
mod security;
mod submit;
mod tasks;
