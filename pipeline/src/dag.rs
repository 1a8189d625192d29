//! Ordering the stages of a pipeline, and naming a cycle when there is one.

use std::collections::HashMap;

/// Indices of `nodes` in an order where every node comes after the nodes it needs.
///
/// `nodes` are `(name, needs)`; every need must name a node. Ties keep config order,
/// so the printed plan reads like the file. On a cycle, returns its node names with
/// the first repeated at the end (`a → b → a`).
pub fn topological_order(nodes: &[(String, Vec<String>)]) -> Result<Vec<usize>, Vec<String>> {
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    let mut state = vec![Mark::New; nodes.len()];
    let mut order = Vec::with_capacity(nodes.len());
    let mut path = Vec::new();
    for start in 0..nodes.len() {
        visit(start, nodes, &index, &mut state, &mut order, &mut path)?;
    }
    Ok(order)
}

#[derive(Clone, Copy, PartialEq)]
enum Mark {
    New,
    OnPath,
    Done,
}

/// Depth-first post-order; `path` holds the nodes on the current descent so that a
/// back edge can be reported as the cycle it closes.
fn visit(
    node: usize,
    nodes: &[(String, Vec<String>)],
    index: &HashMap<&str, usize>,
    state: &mut [Mark],
    order: &mut Vec<usize>,
    path: &mut Vec<usize>,
) -> Result<(), Vec<String>> {
    match state[node] {
        Mark::Done => return Ok(()),
        Mark::OnPath => {
            let from = path.iter().position(|&n| n == node).unwrap_or(0);
            let mut cycle: Vec<String> = path[from..].iter().map(|&n| nodes[n].0.clone()).collect();
            cycle.push(nodes[node].0.clone());
            return Err(cycle);
        }
        Mark::New => {}
    }
    state[node] = Mark::OnPath;
    path.push(node);
    for need in &nodes[node].1 {
        if let Some(&dep) = index.get(need.as_str()) {
            visit(dep, nodes, index, state, order, path)?;
        }
    }
    path.pop();
    state[node] = Mark::Done;
    order.push(node);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(edges: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn orders_needs_first_and_keeps_config_order_for_ties() {
        let nodes = g(&[("c", &["b"]), ("a", &[]), ("b", &["a"]), ("d", &[])]);
        let order: Vec<_> = topological_order(&nodes)
            .unwrap()
            .into_iter()
            .map(|i| nodes[i].0.as_str())
            .collect();
        assert_eq!(order, ["a", "b", "c", "d"]);
    }

    #[test]
    fn names_the_cycle() {
        let nodes = g(&[("a", &[]), ("b", &["a", "d"]), ("c", &["b"]), ("d", &["c"])]);
        let cycle = topological_order(&nodes).unwrap_err();
        assert_eq!(cycle, ["b", "d", "c", "b"]);
    }
}
