"""The three methods and the auto policy: AdaptiveDiffusion's skip hook and its shipped policy, BudgetFusion's budget predictor and step rules, the calibrated auto policy."""
