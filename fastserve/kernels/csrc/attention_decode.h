// What the decode-attention kernel (attention_item.cc: decode, decode_run) and its handler (attention_ffi.cc: which
// runs go where, how much scratch they get) must agree on.
#pragma once
#include <cstdint>

constexpr int64_t kRunRows = 8;       // query rows (column × head) decode_run takes per pass over the keys
// the widest run of one row's columns decode_run takes (wider ones: the forward kernel's query tiles)
constexpr int64_t kRunColumns = 32;
constexpr int64_t kLongRow = 512;     // positions from which one token's row goes through decode_run too
