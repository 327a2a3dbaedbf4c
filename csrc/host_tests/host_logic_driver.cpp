// Host test driver for the host-testable parts of the CUDA kernels (tests/test_cuda_host_logic.py
// compiles it with g++ and checks its answers against Python/float64 references). It reads one
// command and its data from stdin and writes the answer to stdout, all whitespace-separated:
//
//   keys NAN_RANK N (BITS INDEX)*N         -> N lines "KEY SCORE_BITS INDEX"
//   topk KP NAN_RANK LANES N (BITS INDEX)*N -> the KP best by insertion into one list, then the
//                                            same stream dealt round-robin to LANES lists and
//                                            merged by the butterfly of the kernel: two lines of KP keys
//   layout                                 -> 32 lines "A_ROW A_BYTE B_ROW B_BYTE (ACC_ROW ACC_COL)*4"
//   epilogue KP MT NT COSINE NAN_RANK TILES CODES ROWS_VALID  then TILES*(32*MT*NT*4) accumulator
//            floats (tile, lane, mi, ni, reg) and CODES terms
//                                          -> per row (MT*16 of them): KP keys of the warp's merged list,
//                                            two warps' lists merged as the kernel does across warps_n
//   distance N (SCORE_BITS SQNORM_BITS COSINE)*N -> N result bits
//   divmod N (NUM DIV)*N                   -> N lines "QUOTIENT REMAINDER"
//   patch B C H W P SB SC SH SW N_IMG N (ID ROW K)*N -> N lines "OK BASE OFFSET CHANNEL"
//   segments E K COLUMNS ORDER_SEED codes[E] values[E*COLUMNS] -> K lines "WRITTEN v_0 .. v_{COLUMNS-1}"
//   limits N (X Y Z STATIC DYNAMIC LIMIT)*N -> N lines "GRID_OK SHARED_OK"
//   tiles N DIM_BYTES*N                    -> per D: "PITCH RESIDENT_KP1 .. RESIDENT_KP16 STREAMING_KP1 .. _KP16"
//                                            (KP = 1, 2, 4, 8, 16), then a last line of the constants
//                                            "THREADS CODES STAGE_PITCH STAGES ROWS_KP1 .. ROWS_KP16"
//   tiling N (ROWS VALUES)*N               -> N lines "THREADS_X THREADS_Y BLOCKS_X BLOCKS_Y"
//   wgmma_layout ROWS COLUMNS              -> ROWS lines of COLUMNS core-matrix byte offsets (wgmma_ops.h)
//   descriptor N (ADDRESS LEADING STRIDE)*N -> N lines "DESCRIPTOR" (64-bit, decimal)
//   dispatch N (MAJOR MINOR SIXTEEN IMAGE STATIC DYNAMIC LIMIT ENABLED)*N -> N lines "KERNEL" (0 mma.sync, 1 wgmma)
//   wgmma_switch N VALUE*N                 -> N lines "ENABLED" for PACOFR_CUDA_WGMMA=VALUE ("-" for unset)
//   wgmma_shared N DIM_BYTES*N             -> N lines "BYTES" (dynamic shared memory of the Hopper kernel)
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../fast_divmod.h"
#include "../launch_limits.h"
#include "../mma_layout.h"
#include "../patch_index.h"
#include "../rank_keys.h"
#include "../ranking_dispatch.h"
#include "../ranking_epilogue.h"
#include "../ranking_tiles.h"
#include "../segment_reduce.h"
#include "../wgmma_ops.h"

using pacofr::rank::Key;
using pacofr::rank::NanRank;

namespace {

uint32_t read_u32(std::istream& in) {
  unsigned long long v;
  in >> v;
  return static_cast<uint32_t>(v);
}

float read_bits_float(std::istream& in) { return pacofr::rank::bits_to_float(read_u32(in)); }

void run_keys(std::istream& in) {
  const auto nan_rank = static_cast<NanRank>(read_u32(in));
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    const float score = read_bits_float(in);
    const uint32_t index = read_u32(in);
    const Key key = pacofr::rank::make_key(score, index, nan_rank);
    std::printf("%llu %u %u\n", key, pacofr::rank::float_to_bits(pacofr::rank::key_score(key)),
                pacofr::rank::key_index(key));
  }
}

template <int KP>
void print_list(const Key (&list)[KP]) {
  for (int j = 0; j < KP; ++j) std::printf(j ? " %llu" : "%llu", list[j]);
  std::printf("\n");
}

template <int KP>
void run_topk(std::istream& in) {
  const auto nan_rank = static_cast<NanRank>(read_u32(in));
  const uint32_t lanes = read_u32(in);  // a power of two, as the butterfly needs
  const uint32_t n = read_u32(in);
  std::vector<Key> stream(n);
  for (uint32_t i = 0; i < n; ++i) {
    const float score = read_bits_float(in);
    stream[i] = pacofr::rank::make_key(score, read_u32(in), nan_rank);
  }
  Key single[KP];
  pacofr::rank::clear_list<KP>(single);
  for (Key key : stream) pacofr::rank::insert_key<KP>(single, key);
  print_list<KP>(single);

  std::vector<std::vector<Key>> lists(lanes, std::vector<Key>(KP));
  for (auto& list : lists) std::fill(list.begin(), list.end(), pacofr::rank::kEmptyKey);
  auto as_array = [](std::vector<Key>& v) -> Key(&)[KP] { return *reinterpret_cast<Key(*)[KP]>(v.data()); };
  for (uint32_t i = 0; i < n; ++i) pacofr::rank::insert_key<KP>(as_array(lists[i % lanes]), stream[i]);
  for (uint32_t offset = 1; offset < lanes; offset <<= 1) {  // every lane merges its xor partner's list
    const auto snapshot = lists;
    for (uint32_t lane = 0; lane < lanes; ++lane) {
      auto other = snapshot[lane ^ offset];
      pacofr::rank::merge_lists<KP>(as_array(lists[lane]), as_array(other));
    }
  }
  for (uint32_t lane = 1; lane < lanes; ++lane) {
    if (lists[lane] != lists[0]) {
      std::printf("butterfly lanes disagree\n");
      return;
    }
  }
  print_list<KP>(as_array(lists[0]));
}

void run_layout() {
  for (int lane = 0; lane < pacofr::mma::kWarpSize; ++lane) {
    const auto a = pacofr::mma::a_ldmatrix_source(lane);
    const auto b = pacofr::mma::b_ldmatrix_source(lane);
    std::printf("%d %d %d %d", a.row, a.byte, b.row, b.byte);
    for (int reg = 0; reg < 4; ++reg) {
      const auto c = pacofr::mma::accumulator_position(lane, reg);
      std::printf(" %d %d", c.row, c.byte);
    }
    std::printf("\n");
  }
}

// One warp tile (two warps along codes, as the kernel's warps_n = 2) through the kernel's epilogue:
// per lane insert_tile_scores for every tile, the quad butterfly (xor 1, 2) and the cross-warp merge.
template <int KP, int MT, int NT>
void run_epilogue(std::istream& in) {
  const bool cosine = read_u32(in) != 0;
  const auto nan_rank = static_cast<NanRank>(read_u32(in));
  const uint32_t tiles = read_u32(in);  // code tiles of NT*8 codes per warp; warp w takes tiles w, w+2, ...
  const int64_t n_codes = read_u32(in);
  std::vector<float> acc_in(static_cast<size_t>(tiles) * 32 * MT * NT * 4);
  for (auto& v : acc_in) v = read_bits_float(in);
  std::vector<float> terms(n_codes);
  for (auto& t : terms) t = read_bits_float(in);
  const auto term_at = [&](int64_t code) { return terms[code]; };

  struct LaneLists {
    Key slots[2 * MT][KP];
  };
  std::vector<LaneLists> warp_lists[2] = {std::vector<LaneLists>(32), std::vector<LaneLists>(32)};
  for (auto& warp : warp_lists)
    for (auto& lane_lists : warp)
      for (auto& list : lane_lists.slots) pacofr::rank::clear_list<KP>(list);
  for (uint32_t tile = 0; tile < tiles; ++tile) {
    auto& lanes = warp_lists[tile % 2];
    for (int lane = 0; lane < 32; ++lane) {
      float acc[MT][NT][4];
      for (int mi = 0; mi < MT; ++mi)
        for (int ni = 0; ni < NT; ++ni)
          for (int r = 0; r < 4; ++r)
            acc[mi][ni][r] = acc_in[(((static_cast<size_t>(tile) * 32 + lane) * MT + mi) * NT + ni) * 4 + r];
      pacofr::rank::insert_tile_scores<KP, MT, NT>(lane, acc, static_cast<int64_t>(tile) * NT * 8, n_codes, term_at,
                                                   cosine, nan_rank, lanes[lane].slots);
    }
  }
  for (auto& lanes : warp_lists) {
    for (int offset = 1; offset < 4; offset <<= 1) {
      const auto snapshot = lanes;
      for (int lane = 0; lane < 32; ++lane)
        for (int slot = 0; slot < 2 * MT; ++slot)
          pacofr::rank::merge_lists<KP>(lanes[lane].slots[slot], snapshot[lane ^ offset].slots[slot]);
    }
  }
  std::vector<std::vector<Key>> rows(MT * 16);
  for (int lane = 0; lane < 32; lane += 4) {
    for (int slot = 0; slot < 2 * MT; ++slot) {
      Key (&merged)[KP] = warp_lists[0][lane].slots[slot];
      pacofr::rank::merge_lists<KP>(merged, warp_lists[1][lane].slots[slot]);
      rows[pacofr::rank::list_row(lane, slot)].assign(merged, merged + KP);
    }
  }
  for (const auto& row : rows) {
    for (int j = 0; j < KP; ++j) std::printf(j ? " %llu" : "%llu", row[j]);
    std::printf("\n");
  }
}

void run_distance(std::istream& in) {
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    const float score = read_bits_float(in);
    const float squared_norm = read_bits_float(in);
    const bool cosine = read_u32(in) != 0;
    std::printf("%u\n", pacofr::rank::float_to_bits(pacofr::rank::reported_distance(score, squared_norm, cosine)));
  }
}

void run_divmod(std::istream& in) {
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t numerator = read_u32(in);
    const pacofr::FastDivmod divider(read_u32(in));
    const uint32_t q = divider.div(numerator);
    std::printf("%u %u\n", q, divider.mod(numerator, q));
  }
}

void run_patch(std::istream& in) {
  long long b, c, h, w, p, sb, sc, sh, sw, n_img, n;
  in >> b >> c >> h >> w >> p >> sb >> sc >> sh >> sw >> n_img >> n;
  pacofr::patches::PatchIndexer g;
  g.stride_b = sb;
  g.stride_c = sc;
  g.stride_h = sh;
  g.stride_w = sw;
  g.num_patches = static_cast<uint32_t>((h / p) * (w / p));
  g.patch = static_cast<uint32_t>(p);
  g.patch_dim = static_cast<uint32_t>(p * p * c);
  g.channels = pacofr::FastDivmod(static_cast<uint32_t>(c));
  g.patch_side = pacofr::FastDivmod(static_cast<uint32_t>(p));
  g.grid_cols = pacofr::FastDivmod(static_cast<uint32_t>(w / p));
  g.rows_per_image = pacofr::FastDivmod(static_cast<uint32_t>(n_img));
  (void)b;
  for (long long i = 0; i < n; ++i) {
    long long id, row, k;
    in >> id >> row >> k;
    int64_t base = -1;
    const bool ok = g.patch_base(id, static_cast<uint32_t>(row), &base);
    std::printf("%d %lld %lld %u\n", ok ? 1 : 0, static_cast<long long>(ok ? base : -1),
                static_cast<long long>(g.value_offset(static_cast<uint32_t>(k))),
                g.value_channel(static_cast<uint32_t>(k)));
  }
}

// Both passes of the segment reduction over host arrays, chunks visited in a shuffled order (the
// result must not depend on it).
void run_segments(std::istream& in) {
  const uint32_t n_entries = read_u32(in);
  const int64_t n_codes = read_u32(in);
  const uint32_t columns = read_u32(in);
  const uint32_t seed = read_u32(in);
  std::vector<int64_t> codes(n_entries);
  for (auto& c : codes) {
    long long v;
    in >> v;
    c = v;
  }
  std::vector<float> values(static_cast<size_t>(n_entries) * columns);
  for (auto& v : values) v = read_bits_float(in);
  std::vector<int64_t> starts(n_codes + 1);
  for (int64_t k = 0; k <= n_codes; ++k)
    starts[k] = std::lower_bound(codes.begin(), codes.end(), k) - codes.begin();  // searchsorted (left)
  const pacofr::segments::SortedEntries entries{codes.data(), starts.data(), static_cast<int32_t>(n_entries), n_codes};
  const int32_t n_chunks = static_cast<int32_t>((n_entries + pacofr::segments::kChunkEntries - 1) /
                                                pacofr::segments::kChunkEntries);
  std::vector<float> out(static_cast<size_t>(n_codes) * columns, 0.0f);
  std::vector<int> written(n_codes, 0);
  std::vector<float> partial(static_cast<size_t>(n_chunks) * 2 * columns, std::nanf(""));
  auto slot = [&](pacofr::segments::Part part, int32_t chunk, int32_t column) -> float& {
    return partial[(static_cast<size_t>(chunk) * 2 + (part == pacofr::segments::Part::kTail ? 1 : 0)) * columns + column];
  };
  std::vector<int32_t> order(n_chunks);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  const auto value = [&](int32_t p, int64_t, int32_t column) { return values[static_cast<size_t>(p) * columns + column]; };
  const auto store = [&](pacofr::segments::Part part, int32_t chunk, int64_t code, int32_t column, float sum) {
    if (part == pacofr::segments::Part::kWhole) {
      out[code * columns + column] = sum;
      written[code] += 1;
    } else {
      slot(part, chunk, column) = sum;
    }
  };
  for (int32_t chunk : order)
    for (uint32_t column = 0; column < columns; ++column)
      pacofr::segments::reduce_chunk_column(entries, chunk, static_cast<int32_t>(column), value, store);
  const auto read_partial = [&](pacofr::segments::Part part, int32_t chunk, int32_t column) { return slot(part, chunk, column); };
  const auto store_total = [&](int64_t code, int32_t column, float total) {
    out[code * columns + column] = total;
    written[code] += 1;
  };
  std::shuffle(order.begin(), order.end(), std::mt19937(seed + 1));
  for (int32_t chunk : order)
    for (uint32_t column = 0; column < columns; ++column)
      pacofr::segments::finish_tail_column(entries, chunk, static_cast<int32_t>(column), read_partial, store_total);
  for (int64_t k = 0; k < n_codes; ++k) {
    std::printf("%d", written[k]);
    for (uint32_t column = 0; column < columns; ++column)
      std::printf(" %u", pacofr::rank::float_to_bits(out[k * columns + column]));
    std::printf("\n");
  }
}

void run_limits(std::istream& in) {
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    long long x, y, z, s, d, limit;
    in >> x >> y >> z >> s >> d >> limit;
    std::printf("%d %d\n", pacofr::launch::grid_fits(x, y, z) ? 1 : 0,
                pacofr::launch::shared_memory_fits(static_cast<size_t>(s), static_cast<size_t>(d),
                                                   static_cast<size_t>(limit)) ? 1 : 0);
  }
}

constexpr int kListLengths[] = {1, 2, 4, 8, 16};

void run_tiles(std::istream& in) {
  namespace r = pacofr::ranking;
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    const int64_t dim_bytes = read_u32(in);
    std::printf("%lld", static_cast<long long>(r::resident_pitch(dim_bytes)));
    for (int kp : kListLengths) std::printf(" %lld", static_cast<long long>(r::resident_shared_bytes(r::block_rows_for(kp), dim_bytes)));
    for (int kp : kListLengths) std::printf(" %lld", static_cast<long long>(r::streaming_shared_bytes(r::block_rows_for(kp))));
    std::printf("\n");
  }
  std::printf("%d %d %d %d", r::kThreads, r::kCodes, r::kStagePitch, r::kStages);
  for (int kp : kListLengths) std::printf(" %d", r::block_rows_for(kp));
  std::printf("\n");
}

void run_wgmma_layout(std::istream& in) {
  const int rows = static_cast<int>(read_u32(in)), columns = static_cast<int>(read_u32(in));
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < columns; ++c) std::printf(c ? " %u" : "%u", pacofr::wgmma::core_offset(r, c, columns));
    std::printf("\n");
  }
}

void run_descriptor(std::istream& in) {
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    const uint32_t address = read_u32(in), leading = read_u32(in), stride = read_u32(in);
    std::printf("%llu\n", static_cast<unsigned long long>(pacofr::wgmma::descriptor(address, leading, stride)));
  }
}

void run_dispatch(std::istream& in) {
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    pacofr::ranking::DispatchFacts facts;
    facts.major = static_cast<int>(read_u32(in));
    facts.minor = static_cast<int>(read_u32(in));
    facts.sixteen_bit = read_u32(in) != 0;
    facts.wgmma_image = read_u32(in) != 0;
    facts.static_shared = read_u32(in);
    facts.wgmma_dynamic = read_u32(in);
    facts.shared_limit = read_u32(in);
    const bool enabled = read_u32(in) != 0;
    std::printf("%d\n", static_cast<int>(pacofr::ranking::choose_kernel(facts, enabled)));
  }
}

void run_wgmma_switch(std::istream& in) {
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    std::string value;
    in >> value;
    std::printf("%d\n", pacofr::ranking::wgmma_enabled(value == "-" ? nullptr : value.c_str()) ? 1 : 0);
  }
}

void run_wgmma_shared(std::istream& in) {
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    std::printf("%lld\n", static_cast<long long>(pacofr::ranking::wgmma_shared_bytes(read_u32(in))));
  }
}

void run_tiling(std::istream& in) {
  const uint32_t n = read_u32(in);
  for (uint32_t i = 0; i < n; ++i) {
    long long rows, values;
    in >> rows >> values;
    const auto t = pacofr::patches::tile_rows_by_values(rows, values);
    std::printf("%d %d %lld %lld\n", t.threads_x, t.threads_y, static_cast<long long>(t.blocks_x),
                static_cast<long long>(t.blocks_y));
  }
}

template <int MT, int NT>
bool dispatch_epilogue_kp(uint32_t kp, std::istream& in) {
  switch (kp) {
    case 1: run_epilogue<1, MT, NT>(in); return true;
    case 2: run_epilogue<2, MT, NT>(in); return true;
    case 4: run_epilogue<4, MT, NT>(in); return true;
    case 8: run_epilogue<8, MT, NT>(in); return true;
    case 16: run_epilogue<16, MT, NT>(in); return true;
    default: return false;
  }
}

}  // namespace

int main() {
  std::ios::sync_with_stdio(false);
  const std::map<std::string, void (*)(std::istream&)> simple = {
      {"keys", run_keys},         {"distance", run_distance}, {"divmod", run_divmod}, {"patch", run_patch},
      {"segments", run_segments}, {"limits", run_limits},     {"tiles", run_tiles},   {"tiling", run_tiling},
      {"wgmma_layout", run_wgmma_layout}, {"descriptor", run_descriptor}, {"dispatch", run_dispatch},
      {"wgmma_shared", run_wgmma_shared}, {"wgmma_switch", run_wgmma_switch},
  };
  std::string command;
  std::cin >> command;
  if (const auto found = simple.find(command); found != simple.end()) {
    found->second(std::cin);
  } else if (command == "layout") {
    run_layout();
  } else if (command == "topk") {
    switch (read_u32(std::cin)) {
      case 1: run_topk<1>(std::cin); break;
      case 2: run_topk<2>(std::cin); break;
      case 4: run_topk<4>(std::cin); break;
      case 8: run_topk<8>(std::cin); break;
      case 16: run_topk<16>(std::cin); break;
      default: std::fprintf(stderr, "topk: KP must be 1, 2, 4, 8 or 16\n"); return 2;
    }
  } else if (command == "epilogue") {
    const uint32_t kp = read_u32(std::cin), mt = read_u32(std::cin), nt = read_u32(std::cin);
    const bool ok = (nt == 8 && mt == 1 && dispatch_epilogue_kp<1, 8>(kp, std::cin)) ||
                     (nt == 8 && mt == 2 && dispatch_epilogue_kp<2, 8>(kp, std::cin)) ||
                     (nt == 16 && mt == 1 && dispatch_epilogue_kp<1, 16>(kp, std::cin));  // the wgmma warp tile
    if (!ok) {
      std::fprintf(stderr, "epilogue: unsupported KP=%u MT=%u NT=%u\n", kp, mt, nt);
      return 2;
    }
  } else {
    std::fprintf(stderr, "unknown command %s\n", command.c_str());
    return 2;
  }
  return 0;
}
