// The small handler objects a model folder implements for the shared machinery in handlers/.
//
// A model "wires" a capability by putting a handler object in its ModelSpec (registry.h). The
// metadata rows for that capability are derived from the handler, never typed a second time: the
// `_lora` row lists LoraHandler::FormatNames(), the `_weight_mapping` row lists
// WeightMappingHandler::VariantNames(). A spec without the handler has no row.
//
// Handler objects are owned by their model folder (static lifetime), immutable and thread-safe.
#pragma once

#include "handlers/block_cache.h"         // CacheHandler
#include "handlers/ip_adapter_handler.h"  // IPAdapterHandler
#include "handlers/lora_format.h"         // LoraHandler
#include "handlers/weight_mapping.h"      // WeightMappingHandler
