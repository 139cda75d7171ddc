// Balanced assignment by a Gauss-Seidel forward auction with epsilon scaling (CPU).
//
// The same slot problem as fairseq_base/assignment.py: floor(T/E) main slots per expert,
// one extra slot per expert when E does not divide T, and E - (T mod E) phantom rows that
// may only take extra slots (benefit 0), so that every slot is filled. One row bids at a
// time; each slot column keeps its holders in a min-heap of bids, so that a bid costs
// O(columns + log capacity). A phase keeps every holder that still satisfies
// eps-complementary slackness; that check first uses a stale upper bound of the row's best
// other value (prices only rise, so it only overestimates) and rescans only rows it flags.
//
// The epsilons are given in units of the largest row spread. Where the scores are far from 0
// next to that spread, each row is shifted as in assignment.py's _shifted (its maximum
// subtracted; the optimum does not change), so that an epsilon step is never lost to rounding.
// At most max_bids bids are placed; rows still unassigned then are returned as -1. The pass
// that measures the spread also finds NaN and infinite scores, for which the caller computes
// stand-ins only then.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace {

using Bid = std::pair<double, int64_t>;  // (bid, row); min-heap on bid
const double kForbidden = -std::numeric_limits<double>::infinity();
const double kSmallestUnit = 1e-280;  // as SMALLEST_UNIT in assignment.py
// Scores within 16 spreads of 0 need no shift for up to 1e7 rows: the final epsilon,
// 1e-6 / rows spreads, is then still 30 ulps of the largest value.
const double kUnshiftedMagnitude = 16.0;
const int64_t kUnshiftedRows = 10000000;

template <typename scalar_t>
struct SlotProblem {
  const scalar_t* scores;  // [T, E] row-major, see shift()
  int64_t tokens, experts, main_cols, cols, rows;
  std::vector<int64_t> capacity;
  std::vector<scalar_t> shifted_scores;
  double unit;  // the largest row spread (1 if every row is about constant)

  double benefit(int64_t row, int64_t col) const {
    if (row < tokens) return scores[row * experts + (col < main_cols ? col : col - main_cols)];
    return col < main_cols ? kForbidden : 0.0;  // phantom row
  }

  // Points scores at ``raw``, or at a copy with each row shifted (in double, then rounded)
  // where the scores' magnitude would swamp the final epsilon. False if a score is not finite
  // (the sum of a row is then NaN or infinite; a false alarm for double scores whose sum
  // overflows costs only the caller's stand-ins), in the one pass that reads the scores.
  bool shift(const scalar_t* raw) {
    scores = raw;
    std::vector<double> row_spread(tokens, 0.0), row_magnitude(tokens, 0.0);
    std::vector<char> row_finite(tokens, 1);
    at::parallel_for(0, tokens, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* s = raw + t * experts;
        scalar_t hi = s[0], lo = s[0];
        double sum = 0.0;
        for (int64_t e = 0; e < experts; ++e) {
          hi = s[e] > hi ? s[e] : hi;
          lo = s[e] < lo ? s[e] : lo;
          sum += s[e];
        }
        row_finite[t] = std::isfinite(sum);
        row_spread[t] = static_cast<double>(hi) - static_cast<double>(lo);
        row_magnitude[t] = std::max(std::abs(static_cast<double>(hi)), std::abs(static_cast<double>(lo)));
      }
    });
    if (std::find(row_finite.begin(), row_finite.end(), 0) != row_finite.end()) return false;
    const double spread = *std::max_element(row_spread.begin(), row_spread.end());
    const double magnitude = *std::max_element(row_magnitude.begin(), row_magnitude.end());
    unit = spread >= kSmallestUnit ? spread : 1.0;
    if (magnitude <= kUnshiftedMagnitude * unit && rows <= kUnshiftedRows) return true;
    shifted_scores.resize(tokens * experts);
    at::parallel_for(0, tokens, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* s = raw + t * experts;
        const double hi = *std::max_element(s, s + experts);
        for (int64_t e = 0; e < experts; ++e) shifted_scores[t * experts + e] = static_cast<double>(s[e]) - hi;
      }
    });
    scores = shifted_scores.data();
    return true;
  }
};

// The best and second-best of s[e] - price[e] over e < n (s == nullptr: scores of 0), kept
// per lane without branches so that the compiler vectorises it at the vector width it builds
// for (setup.py builds the kernel for several x86-64 levels; assignment.py loads the one the
// CPU supports).
template <typename scalar_t>
inline void top_two(const scalar_t* s, const double* price, int64_t n, double* v1, double* v2) {
  constexpr int kLanes = 8;
  double m1[kLanes], m2[kLanes];
  for (int l = 0; l < kLanes; ++l) m1[l] = m2[l] = kForbidden;
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double v = (s ? static_cast<double>(s[e + l]) : 0.0) - price[e + l];
      m2[l] = std::max(m2[l], std::min(m1[l], v));
      m1[l] = std::max(m1[l], v);
    }
  }
  for (; e < n; ++e) {
    const double v = (s ? static_cast<double>(s[e]) : 0.0) - price[e];
    m2[0] = std::max(m2[0], std::min(m1[0], v));
    m1[0] = std::max(m1[0], v);
  }
  double best = kForbidden, second = kForbidden;
  for (int l = 0; l < kLanes; ++l) {
    second = std::max(second, std::max(m2[l], std::min(best, m1[l])));
    best = std::max(best, m1[l]);
  }
  *v1 = best;
  *v2 = second;
}


template <typename scalar_t>
struct Auction {
  const SlotProblem<scalar_t>& p;
  std::vector<double> price;
  std::vector<int64_t> column;       // slot column of each row, -1 if none
  std::vector<double> other;         // upper bound of the row's best value elsewhere
  std::vector<std::vector<Bid>> heap;
  std::vector<int64_t> unassigned;
  int64_t bids_left;

  Auction(const SlotProblem<scalar_t>& problem, int64_t max_bids)
      : p(problem), price(problem.cols, 0.0), column(problem.rows, -1),
        other(problem.rows, std::numeric_limits<double>::infinity()), heap(problem.cols),
        bids_left(max_bids) {}

  // Best and second-best column of a row at current prices: the hot loop, one multi-ISA pass
  // over the row's scores (see top_two), then a scan for the first column with the best value.
  void best_two(int64_t row, int64_t* best, double* v1, double* v2) const {
    const int64_t extra = p.main_cols;
    const bool has_extra = p.cols > p.main_cols;
    if (row >= p.tokens) {  // phantom: extra slots only, benefit 0
      top_two(static_cast<const scalar_t*>(nullptr), price.data() + extra, p.experts, v1, v2);
      *best = extra + std::find_if(price.begin() + extra, price.end(), [&](double q) { return -q == *v1; }) -
              (price.begin() + extra);
      return;
    }
    const scalar_t* s = p.scores + row * p.experts;
    double main1 = kForbidden, main2 = kForbidden, extra1 = kForbidden, extra2 = kForbidden;
    if (p.main_cols) top_two(s, price.data(), p.experts, &main1, &main2);
    if (has_extra) top_two(s, price.data() + extra, p.experts, &extra1, &extra2);
    *v1 = std::max(main1, extra1);
    *v2 = std::max(std::min(main1, extra1), std::max(main2, extra2));
    // The first column, in the order main e, extra e, main e + 1, ..., whose value is the best.
    for (int64_t e = 0;; ++e) {
      const double score = s[e];
      if (p.main_cols && score - price[e] == *v1) {
        *best = e;
        return;
      }
      if (has_extra && score - price[extra + e] == *v1) {
        *best = extra + e;
        return;
      }
    }
  }

  // Row bids for column col, where v2 is its best value elsewhere (at current or earlier
  // prices: prices only rise, so an earlier v2 still gives a valid bid).
  void place(int64_t row, int64_t col, double v2, double eps) {
    --bids_left;
    double amount = p.benefit(row, col) - v2 + eps;
    auto& h = heap[col];
    h.emplace_back(amount, row);
    std::push_heap(h.begin(), h.end(), std::greater<Bid>());
    column[row] = col;
    other[row] = v2;
    if (static_cast<int64_t>(h.size()) > p.capacity[col]) {
      std::pop_heap(h.begin(), h.end(), std::greater<Bid>());
      int64_t evicted = h.back().second;
      h.pop_back();
      column[evicted] = -1;
      unassigned.push_back(evicted);
    }
    if (static_cast<int64_t>(h.size()) == p.capacity[col]) price[col] = h.front().first;
  }

  // Keep the holders that satisfy eps-CS (each at the bid it would make now); rebuild heaps.
  void start_phase(double eps) {
    for (auto& h : heap) h.clear();
    for (int64_t row = 0; row < p.rows; ++row) {
      int64_t col = column[row];
      if (col < 0) {
        unassigned.push_back(row);
        continue;
      }
      double own = p.benefit(row, col) - price[col];
      if (own < other[row] - eps) {  // the bound is stale: look again
        int64_t best;
        double v1, v2;
        best_two(row, &best, &v1, &v2);
        other[row] = best == col ? v2 : v1;  // the best value of a column other than col
        if (own < other[row] - eps) {
          column[row] = -1;
          unassigned.push_back(row);
          continue;
        }
      }
      double amount = std::max(p.benefit(row, col) - other[row] + eps, price[col]);
      heap[col].emplace_back(amount, row);
    }
    for (int64_t c = 0; c < p.cols; ++c) {
      auto& h = heap[c];
      std::make_heap(h.begin(), h.end(), std::greater<Bid>());
      if (static_cast<int64_t>(h.size()) == p.capacity[c]) price[c] = h.front().first;
    }
  }

  // False if the bid budget ran out (rows may then be left unassigned).
  bool run_phase(double eps) {
    start_phase(eps);
    // The phase's first bids only read prices, so compute them in parallel (in the first
    // phase that is every row: the greedy pass), then place them one by one.
    std::vector<int64_t> first;
    first.swap(unassigned);
    const int64_t n = first.size();
    std::vector<int64_t> target(n);
    std::vector<double> second(n);
    at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double v1;
        best_two(first[i], &target[i], &v1, &second[i]);
      }
    });
    for (int64_t i = 0; i < n; ++i) place(first[i], target[i], second[i], eps);
    while (!unassigned.empty()) {
      if (bids_left <= 0) return false;
      int64_t row = unassigned.back();
      unassigned.pop_back();
      int64_t best;
      double v1, v2;
      best_two(row, &best, &v1, &v2);
      place(row, best, v2, eps);
    }
    return true;
  }
};

template <typename scalar_t>
torch::Tensor run_auction(const torch::Tensor& s, double initial_eps, double final_eps, double eps_factor,
                          int64_t max_bids) {
  SlotProblem<scalar_t> p;
  p.tokens = s.size(0);
  p.experts = s.size(1);
  int64_t per_expert = p.tokens / p.experts, remainder = p.tokens % p.experts;
  p.main_cols = per_expert > 0 ? p.experts : 0;
  p.cols = p.main_cols + (remainder > 0 ? p.experts : 0);
  p.rows = p.tokens + (remainder > 0 ? p.experts - remainder : 0);
  p.capacity.assign(p.main_cols, per_expert);
  p.capacity.resize(p.cols, 1);
  if (!p.shift(s.data_ptr<scalar_t>())) return torch::empty({0}, torch::kLong);

  Auction<scalar_t> auction(p, max_bids);
  initial_eps *= p.unit;
  final_eps *= p.unit;
  for (double eps = initial_eps;; eps = std::max(eps / eps_factor, final_eps)) {
    if (!auction.run_phase(eps) || eps <= final_eps) break;
  }
  torch::Tensor out = torch::empty({p.rows}, torch::kLong);
  std::copy(auction.column.begin(), auction.column.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

// scores: float32 or float64 [T, E] on CPU with T >= 1, E >= 2; epsilons in units of the
// largest row spread.
// Returns the slot column of every row (tokens, then phantoms), -1 where the bid budget ran
// out; an empty tensor if a score is NaN or infinite (the caller gives them stand-ins).
torch::Tensor auction_assignment(torch::Tensor scores, double initial_eps, double final_eps, double eps_factor,
                                 int64_t max_bids) {
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) >= 1 && scores.size(1) >= 2 && !scores.is_cuda());
  auto s = scores.contiguous();
  torch::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "auction_assignment", [&] {
    out = run_auction<scalar_t>(s, initial_eps, final_eps, eps_factor, max_bids);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("auction_assignment", &auction_assignment, "balanced assignment by auction (CPU)");
}
